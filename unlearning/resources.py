"""The memory a command will at least need, against what this machine has: a size no
machine here can hold (``--height 100000``, ``--model-depth 40``, ``--reference-scenes``
in the millions) is refused in one line before any work. Such sizes used to get the
process killed for memory part-way, or a traceback from inside torch.

The figures are lower bounds (the tensors that must exist, nothing for activations,
copies or the allocator), so a refusal never turns away a run that would fit."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

#: bytes per pixel of each task's target in a dataset (int64 classes, float32 depth and normals)
TARGET_BYTES = {"segmentation": 8, "depth": 4, "normal": 12}
IMAGE_BYTES = 3 * 4  # float32 RGB
#: bytes per parameter while training with AdamW: the weights, their gradients, two moments
TRAINING_BYTES_PER_PARAMETER = 4 * 4

_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def machine_memory() -> int | None:
    """Bytes of memory this process can have: the physical memory, or a container's smaller
    cgroup limit; ``None`` where neither can be read."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX, or not reported
        total = None
    for path in _CGROUP_LIMITS:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max": no limit
            total = int(text) if total is None else min(total, int(text))
        break
    return total


def scene_bytes(tasks: Iterable[str], height: int, width: int) -> int:
    """Bytes one scene of ``height`` x ``width`` pixels holds in a dataset: its image and
    the targets of ``tasks``."""
    return (IMAGE_BYTES + sum(TARGET_BYTES[t] for t in tasks)) * int(height) * int(width)


def human(n: int) -> str:
    """``n`` bytes as a short figure: ``512 B``, ``3.1 GiB``, ``1.4e+09 TiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB" if value < 1e6 else f"{value:.2g} TiB"


def memory_shortfall(needs: dict[str, int], have: int | None = None, where: str = "this machine") -> str | None:
    """What is wrong when the ``needs`` (what -> bytes) add up to more than ``have`` (default:
    :func:`machine_memory`), the memory of ``where``, naming each; ``None`` when they fit or
    nothing is known."""
    have = machine_memory() if have is None else have
    total = sum(needs.values())
    if have is None or total <= have:
        return None
    parts = "; ".join(f"{what}: {human(n)}" for what, n in needs.items() if n)
    return f"needs at least {human(total)} of memory ({parts}), more than the {human(have)} {where} has"


def _rendered(spec: dict) -> tuple[int, int, int, int] | None:
    """``(scenes, height, width, bytes a scene)`` of the synthetic dataset ``spec``; ``None``
    for datasets read from files, and for a spec the loader will refuse (it names what is
    wrong)."""
    from .data import SYNTHETIC_DATASETS, canonical_spec, dataset_tasks

    if not isinstance(spec, dict) or spec.get("name") not in SYNTHETIC_DATASETS:
        return None
    sizes = canonical_spec(spec)
    if not all(type(sizes[k]) is int and sizes[k] >= 0 for k in ("n_train", "n_test", "height", "width")):
        return None
    h, w = sizes["height"], sizes["width"]
    return sizes["n_train"] + sizes["n_test"], h, w, scene_bytes(dataset_tasks(spec), h, w)


def reference_bytes(spec: dict, reference_scenes: int) -> int:
    """What ``reference_scenes`` more scenes of the synthetic dataset ``spec`` hold (0 where
    :func:`data_needs` counts nothing)."""
    rendered = _rendered(spec)
    return int(reference_scenes) * rendered[3] if rendered else 0


def data_needs(spec: dict, reference_scenes: int = 0) -> dict[str, int]:
    """What the rendered splits of the synthetic dataset ``spec`` hold (and ``reference_scenes``
    more scenes of it), or what the splits of an npy dataset will hold once loaded (from
    its files' count and first image's header: :func:`~unlearning.data.npy_format.npy_split_sizes`;
    full-size NYUv2, ~16 GB, got the process killed part-way through loading on a smaller
    host); nothing for a spec the loader will refuse (it names what is wrong)."""
    rendered = _rendered(spec)
    if rendered is None:
        return _npy_needs(spec)
    n, h, w, per_scene = rendered
    needs = {f"the {n} rendered scenes of {h}x{w} pixels": n * per_scene}
    if reference_scenes:
        needs[f"{reference_scenes} reference scenes"] = reference_bytes(spec, reference_scenes)
    return needs


def _npy_needs(spec: dict) -> dict[str, int]:
    from .data.npy_format import TASKS, npy_split_sizes

    if not isinstance(spec, dict) or spec.get("name") not in TASKS:
        return {}
    sizes = npy_split_sizes(spec)
    if sizes is None:
        return {}
    tasks = TASKS[spec["name"]]
    return {f"the {n} {folder} samples of {pixels} pixels": n * scene_bytes(tasks, pixels, 1)
            for folder, n, pixels in sizes}


def model_lower_bound(spec: dict, width: int, depth: int, head_width: int):
    """The smallest :class:`~unlearning.model.ModelConfig` that a model of these widths and
    ``depth`` on ``spec``'s tasks can be: one output channel a task (the dataset's classes
    are not known before it is read), at most 64 stages (whose last alone has
    ``width * 2**63`` channels: counting a depth of 10**9 would take minutes)."""
    from .data import dataset_tasks
    from .model import ModelConfig

    return ModelConfig(tasks={t: 1 for t in dataset_tasks(spec)}, width=width, depth=min(depth, 64),
                       head_width=head_width)


def training_needs(cfg, on_host: bool = True) -> dict[str, int]:
    """What training a model of ``cfg`` (a :class:`~unlearning.model.ModelConfig`) with AdamW
    holds besides its activations: weights, gradients and two moments per parameter; with
    ``on_host=False`` (training on a GPU, where those live), what the host holds of it: the
    weights, while the model is built before it is moved."""
    from .model import parameter_count

    count = parameter_count(cfg)
    shown = f"{count:,}" if count < 10**15 else f"{count:.3g}"
    if not on_host:
        return {f"the model's weights, built on the host ({shown} parameters)": count * 4}
    return {f"the model's weights, gradients and AdamW moments ({shown} parameters)":
            count * TRAINING_BYTES_PER_PARAMETER}


def device_memory(device) -> int | None:
    """Bytes of memory of the CUDA ``device`` (a ``torch.device``); ``None`` for other devices."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def training_shortfall(data: dict[str, int], model, device=None) -> str | None:
    """What is wrong when training ``model`` (a :class:`~unlearning.model.ModelConfig`) beside
    the ``data`` (:func:`data_needs`) cannot fit: on the host, and on a CUDA ``device`` the
    GPU's memory, where the weights, gradients and AdamW moments live (the host then holds
    the weights alone, while the model is built). ``device=None``, not known yet (resolving
    ``auto`` initialises CUDA, which a process about to fork must not do): counted as on a
    GPU whose memory is not checked, a bound that turns away no run that fits."""
    on_gpu = device is None or getattr(device, "type", None) == "cuda"
    problem = memory_shortfall({**data, **training_needs(model, on_host=not on_gpu)})
    if problem or device is None or not on_gpu:
        return problem
    return memory_shortfall(training_needs(model), have=device_memory(device), where=str(device))
