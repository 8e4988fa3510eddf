"""An in-memory multi-task dataset addressed by stable instance ids and supervision cells.

A *cell* is ``(instance_id, task)``. Erasing a cell removes that supervision;
an instance whose every cell is erased is dropped (its image is deleted too),
so partial-task erasure keeps the image for the other tasks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

Cell = tuple[str, str]


@dataclass
class Batch:
    """A batch: images (B,3,H,W); per task, targets and a (B,) bool mask of supervised cells."""

    index: torch.Tensor
    images: torch.Tensor
    targets: dict[str, torch.Tensor]
    has: dict[str, torch.Tensor]

    def to(self, device) -> "Batch":
        return Batch(
            self.index.to(device),
            self.images.to(device),
            {k: v.to(device) for k, v in self.targets.items()},
            {k: v.to(device) for k, v in self.has.items()},
        )


# The channels of each task's targets (see unlearning/tasks): None for a label map (N,H,W),
# else (N,C,H,W). A task not listed here is checked for N and H, W only.
TARGET_CHANNELS: dict[str, int | None] = {"segmentation": None, "depth": 1, "normal": 3}


def check_target_shape(name: str, task: str, target: torch.Tensor, n: int, h: int, w: int) -> None:
    """``ValueError`` naming the dataset ``name``, the ``task``, the shape of ``target`` and the
    shape expected for ``n`` images of ``h`` x ``w``: segmentation (N,H,W), depth (N,1,H,W),
    normal (N,3,H,W); any other task (N,...,H,W)."""
    shape = tuple(target.shape)
    if task in TARGET_CHANNELS:
        channels = TARGET_CHANNELS[task]
        expected = (n, h, w) if channels is None else (n, channels, h, w)
        form = "(N,H,W)" if channels is None else f"(N,{channels},H,W)"
        ok = shape == expected
    else:
        expected, form = (n, "...", h, w), "(N,...,H,W)"
        ok = len(shape) >= 3 and shape[0] == n and shape[-2:] == (h, w)
    if not ok:
        expected_text = "(" + ", ".join(str(d) for d in expected) + ")"
        raise ValueError(f"dataset {name!r}: {task!r} targets have shape {shape}; expected {expected_text}, "
                         f"{form} for {n} images of {h}x{w}")


#: The dtype of images and of every target but a label map: what the loaders and the renderer
#: produce and the model's float32 parameters take (float64 images fail inside the first
#: convolution; float64 targets would run, with losses and metrics at another precision than
#: the loaders' data and twice the memory, so one dtype for all).
FLOAT_DTYPE = torch.float32
#: The dtype of a label map (``TARGET_CHANNELS`` None): what the cross-entropy loss takes as
#: its target. Not converted from other integer types (a copy of every label map) nor from
#: floats, which ``int()`` in the range check would truncate (0.5 passed as class 0).
LABEL_DTYPE = torch.int64


def check_dtypes(name: str, images: torch.Tensor, targets: dict[str, torch.Tensor], tasks: Sequence[str]) -> None:
    """``ValueError`` naming the dataset ``name``, the images or the task, and the dtype given
    and expected, unless the images and every target but a label map are ``FLOAT_DTYPE`` and
    the label maps (segmentation) ``LABEL_DTYPE``; caught here rather than as a torch error
    in the middle of a job."""
    if images.dtype != FLOAT_DTYPE:
        raise ValueError(f"dataset {name!r}: images are {images.dtype}; expected {FLOAT_DTYPE} "
                         f"(0-255 images scaled to [0, 1])")
    for task in tasks:
        label_map = task in TARGET_CHANNELS and TARGET_CHANNELS[task] is None
        expected = LABEL_DTYPE if label_map else FLOAT_DTYPE
        given = targets[task].dtype
        if given != expected:
            what = "class indices, -1 to ignore a pixel" if label_map else "the images' dtype"
            raise ValueError(f"dataset {name!r}: {task!r} targets are {given}; expected {expected} ({what})")


class MultiTaskDataset(torch.utils.data.Dataset):
    """Images, per-task targets, instance ids and a (N,K) mask of the cells still supervised.

    The constructor checks that the instance ids are unique and one per image, that the
    images are (N,C,H,W), that every task has targets of its shape for those images
    (segmentation (N,H,W), depth (N,1,H,W), normal (N,3,H,W): :func:`check_target_shape`),
    that the images and targets are float32 and the segmentation labels int64
    (:func:`check_dtypes`), that ``available`` is (N,K), and, where data enters (no
    ``available`` given), that the segmentation labels are -1 or a class below
    ``num_classes``; ``ValueError`` otherwise.

    The images and targets are read, never written: a dataset derived from another
    (:meth:`without` where no instance is dropped, :meth:`to` its own device) holds the
    same tensors, and the service's cached splits are shared by every job. Code that
    needs other values builds new tensors (a :meth:`batch` is a copy).
    """

    def __init__(
        self,
        name: str,
        tasks: Sequence[str],
        images: torch.Tensor,
        targets: dict[str, torch.Tensor],
        instance_ids: Sequence[str],
        num_classes: int | None = None,
        available: torch.Tensor | None = None,
        erased_instances: Iterable[str] = (),
    ):
        if len(set(instance_ids)) != len(instance_ids):
            seen, repeated = set(), []
            for iid in instance_ids:
                if iid in seen and iid not in repeated:
                    repeated.append(iid)
                seen.add(iid)
            raise ValueError(f"dataset {name!r}: instance ids must be unique; repeated: {repeated[:5]}")
        if images.ndim != 4:
            raise ValueError(f"dataset {name!r}: images have shape {tuple(images.shape)}; expected (N,C,H,W)")
        n, _, h, w = images.shape
        if len(instance_ids) != n:
            raise ValueError(f"dataset {name!r} has {len(instance_ids)} instance ids for {n} images")
        for task in tasks:
            if task not in targets:
                raise ValueError(f"dataset {name!r} lacks targets for task {task!r}")
            check_target_shape(name, task, targets[task], n, h, w)
        check_dtypes(name, images, targets, tasks)
        if available is not None and tuple(available.shape) != (n, len(tasks)):
            raise ValueError(f"dataset {name!r}: the mask of supervised cells has shape {tuple(available.shape)}; "
                             f"expected ({n}, {len(tasks)}), one row per image and one column per task")
        # checked where data enters (no ``available`` mask yet); subsets and erasures
        # of a checked dataset (which pass theirs) need no second pass over the labels
        if available is None and "segmentation" in tasks and num_classes and len(images):
            labels = targets["segmentation"]
            low, high = int(labels.min()), int(labels.max())
            if low < -1 or high >= num_classes:
                # caught here, not as CUDA's device-side assert in the loss
                raise ValueError(f"dataset {name!r}: segmentation labels span [{low}, {high}]; they must be "
                                 f"-1 (ignore) or a class in [0, {num_classes - 1}]")
        self.name = name
        self.tasks = list(tasks)
        self.images = images
        self.targets = {t: targets[t] for t in self.tasks}
        self.instance_ids = list(instance_ids)
        self.num_classes = num_classes
        self.available = (
            available.clone() if available is not None else torch.ones(len(images), len(self.tasks), dtype=torch.bool)
        )
        self._position = {iid: i for i, iid in enumerate(self.instance_ids)}
        # instances :meth:`without` dropped (every cell erased): named as erased, not unknown
        self.erased_instances = frozenset(erased_instances) - set(self._position)

    def __len__(self) -> int:
        return len(self.instance_ids)

    def __getitem__(self, i: int) -> dict:
        return {
            "index": i,
            "instance_id": self.instance_ids[i],
            "image": self.images[i],
            "targets": {t: self.targets[t][i] for t in self.tasks},
            "has": {t: bool(self.available[i, k]) for k, t in enumerate(self.tasks)},
        }

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    def index_of(self, instance_id: str) -> int:
        """Position of ``instance_id``; KeyError naming it when it is not (or no longer) here."""
        try:
            return self._position[instance_id]
        except (KeyError, TypeError):  # TypeError: a list or another unhashable id
            if isinstance(instance_id, str) and instance_id in self.erased_instances:
                raise KeyError(f"instance {instance_id!r} is erased: every cell of it was erased from dataset "
                               f"{self.name!r}") from None
            raise KeyError(f"unknown instance {instance_id!r} in dataset {self.name!r}") from None

    @property
    def nbytes(self) -> int:
        """Bytes held by the images and targets."""
        return sum(t.numel() * t.element_size() for t in (self.images, *self.targets.values()))

    def same_cells(self, other: "MultiTaskDataset") -> bool:
        """``other`` holds the same instances, in the same order, with the same supervised
        cells (wherever either's tensors are)."""
        return (self.instance_ids == other.instance_ids
                and torch.equal(self.available.cpu(), other.available.cpu()))

    def cells_key(self) -> tuple:
        """What the dataset holds, for the keys of what is cached from it: its instances and
        their supervised cells (equal exactly when :meth:`same_cells`). By its size alone, a
        training set with another cell erased read what the first's had shaped."""
        return tuple(self.instance_ids), self.available.cpu().numpy().tobytes()

    def to(self, device) -> "MultiTaskDataset":
        """This dataset with its tensors on ``device`` (the same ids, cells and mask); itself
        when they are there already."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        return MultiTaskDataset(self.name, self.tasks, self.images.to(device),
                                {t: v.to(device) for t, v in self.targets.items()}, self.instance_ids,
                                num_classes=self.num_classes, available=self.available.to(device),
                                erased_instances=self.erased_instances)

    def batch(self, indices: Sequence[int] | torch.Tensor) -> Batch:
        """Stacked tensors for the given positions (no DataLoader needed for in-memory data)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Batch(
            idx,
            self.images[idx],
            {t: self.targets[t][idx] for t in self.tasks},
            {t: self.available[idx, k] for k, t in enumerate(self.tasks)},
        )

    def cells(self) -> list[Cell]:
        """Every supervised cell, in instance order."""
        available = self.available.tolist()  # one copy (from the GPU too), not an element read per cell
        return [(iid, t) for iid, row in zip(self.instance_ids, available) for t, kept in zip(self.tasks, row) if kept]

    def has_cell(self, cell: Cell) -> bool:
        iid, task = cell
        if task not in self.tasks or iid not in self._position:
            return False
        return bool(self.available[self._position[iid], self.tasks.index(task)])

    def check_cells(self, cells: Iterable[Cell]) -> list[Cell]:
        """Validate cells against this dataset and return them as tuples: a clear error for
        something that is no list of (instance_id, task) pairs of strings, an unknown task,
        an unknown instance (KeyError), a cell that is already erased or an instance
        :meth:`without` dropped, every cell of it erased (ValueError)."""
        if isinstance(cells, str) or (isinstance(cells, tuple) and len(cells) == 2
                                      and all(isinstance(x, str) for x in cells)):
            hint = f": pass [{cells!r}]" if isinstance(cells, tuple) else ""
            raise ValueError(f"cells are a list of (instance_id, task) pairs, got {cells!r}{hint}")
        cells = list(cells)
        for cell in cells:
            if not isinstance(cell, (tuple, list)) or len(cell) != 2 or not all(isinstance(x, str) for x in cell):
                raise ValueError(f"a cell is an (instance_id, task) pair of strings, got {cell!r}")
        for iid, task in cells:
            if task not in self.tasks:
                raise ValueError(f"unknown task {task!r} for dataset {self.name!r}; tasks: {self.tasks}")
            if iid in self.erased_instances:
                raise ValueError(f"instance {iid!r} is already erased: every cell of it was erased "
                                 f"from dataset {self.name!r}")
            if iid not in self._position:
                raise KeyError(f"unknown instance {iid!r} in dataset {self.name!r}")
            if not self.available[self._position[iid], self.tasks.index(task)]:
                raise ValueError(f"cell ({iid!r}, {task!r}) is already erased")
        return [(iid, task) for iid, task in cells]

    def without(self, cells: Iterable[Cell], strict: bool = False) -> "MultiTaskDataset":
        """This dataset with ``cells`` erased (a mask of its own); instances left with no
        supervised cell are dropped. Where none is dropped (a partial erasure, cells already
        erased, nothing to erase), the images and targets are this dataset's tensors, not
        copies: a dataset's tensors are never modified in place (class docstring).

        With ``strict`` the cells are validated first (see :meth:`check_cells`);
        otherwise cells already erased or of unknown instances are ignored, which
        is what applying stored tombstones needs.
        """
        cells = self.check_cells(cells) if strict else list(cells)
        available = self.available.clone()
        for iid, task in cells:
            if iid in self._position and task in self.tasks:
                available[self._position[iid], self.tasks.index(task)] = False
        kept = available.any(1)
        if bool(kept.all()):  # every instance stays: its tensors are shared, not copied
            return MultiTaskDataset(self.name, self.tasks, self.images, self.targets, self.instance_ids,
                                    self.num_classes, available, erased_instances=self.erased_instances)
        keep = kept.nonzero().flatten()
        return MultiTaskDataset(
            self.name,
            self.tasks,
            self.images[keep],
            {t: v[keep] for t, v in self.targets.items()},
            [self.instance_ids[i] for i in keep.tolist()],
            self.num_classes,
            available[keep],
            erased_instances=self.erased_instances | {iid for iid, row in zip(self.instance_ids, kept.tolist())
                                                      if not row},
        )

    def subset(self, indices: Sequence[int]) -> "MultiTaskDataset":
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return MultiTaskDataset(
            self.name,
            self.tasks,
            self.images[idx],
            {t: v[idx] for t, v in self.targets.items()},
            [self.instance_ids[i] for i in idx.tolist()],
            self.num_classes,
            self.available[idx],
            erased_instances=self.erased_instances,
        )

    def select(self, instance_ids: Iterable[str]) -> "MultiTaskDataset":
        if isinstance(instance_ids, str):  # iterated, it would be its characters
            raise ValueError(f"select takes a list of instance ids, got the string {instance_ids!r}: "
                             f"pass [{instance_ids!r}]")
        return self.subset([self.index_of(i) for i in instance_ids])
