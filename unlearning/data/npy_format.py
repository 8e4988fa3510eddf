"""Loader for the common preprocessed NYUv2 / Cityscapes layout of ``.npy`` files::

    {root}/{train,val}/image/<n>.npy    (H,W,3) or (3,H,W); uint8 is scaled to [0, 1], float must be in it
    {root}/{train,val}/label/<n>.npy    (H,W) (or a singleton channel); float or int, -1 = ignore
    {root}/{train,val}/depth/<n>.npy    (H,W) (or a singleton channel); 0 = invalid
    {root}/{train,val}/normal/<n>.npy   (H,W,3) or (3,H,W) unit vectors; nyuv2 only

Spec: ``{"name": "nyuv2" | "cityscapes", "root": path, "num_classes": 13 | 7,
"limit": None}``. ``limit`` keeps the first files (numerically) of each split.
The ``val`` split is returned as the test set. Files are read with
``allow_pickle=False``: nothing is ever unpickled.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .base import MultiTaskDataset

TASKS = {"nyuv2": ("segmentation", "depth", "normal"), "cityscapes": ("segmentation", "depth")}
NUM_CLASSES = {"nyuv2": 13, "cityscapes": 7}
FOLDERS = {"segmentation": "label", "depth": "depth", "normal": "normal"}
SPEC_KEYS = {"name", "root", "num_classes", "limit"}
SPLITS = (("train", "train"), ("val", "val"))  # (folder, instance-id infix)
_NUMBERED = re.compile(r"^(\d+)\.npy$")


def _numbered_files(folder: Path) -> dict[int, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"missing folder {folder}")
    return {int(m.group(1)): p for p in folder.iterdir() if (m := _NUMBERED.match(p.name))}


def _read(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:  # a corrupt file or a pickled object array: say which file
        raise ValueError(f"cannot read {path}: {exc}") from exc


def _channels_first(array: np.ndarray, channels: int, size: tuple[int, int], path: Path) -> np.ndarray:
    """(C,H,W) from an (H,W,C), (C,H,W) or, for one channel, (H,W) array of spatial ``size``."""
    if channels == 1 and array.shape == size:
        return array[None]
    if array.shape == (channels, *size):
        return array
    if array.shape == (*size, channels):
        return np.moveaxis(array, -1, 0)
    raise ValueError(f"{path} has shape {array.shape}; expected {(channels, *size)} or {(*size, channels)}")


def _label(path: Path, num_classes: int) -> np.ndarray:
    array = _read(path)
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array.reshape(array.shape[1:] if array.shape[0] == 1 else array.shape[:-1])
    if array.ndim != 2:
        raise ValueError(f"{path} has shape {array.shape}; a label map is (H,W)")
    array = array.astype(np.float64)
    # Negative or non-finite labels mean "ignore" in this format.
    ignore = ~np.isfinite(array) | (array < 0)
    labels = np.where(ignore, -1, np.rint(np.where(ignore, 0, array))).astype(np.int64)
    if labels.max(initial=-1) >= num_classes:
        raise ValueError(
            f"{path} has label {labels.max()} but the dataset has {num_classes} classes "
            "(ignore must be stored as -1; set num_classes in the spec if it differs)"
        )
    return labels


def _image(path: Path, size: tuple[int, int]) -> np.ndarray:
    array = _read(path)
    if array.dtype == np.uint8:
        return _channels_first(array, 3, size, path).astype(np.float32) * np.float32(1.0 / 255.0)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{path}: images must be uint8 (0-255) or float in [0, 1], this one is {array.dtype}")
    image = _channels_first(array, 3, size, path).astype(np.float32)
    if image.size:
        low, high = float(image.min()), float(image.max())  # NaN when there is one
        # Refused, not guessed per file: a file-by-file rescale would treat a dark 0-255
        # image (max <= 1) unlike its neighbours.
        if not (np.isfinite(image).all() and low >= -1e-3 and high <= 1.0 + 1e-3):
            raise ValueError(f"{path}: a float image must hold values in [0, 1], this one spans [{low:.4g}, {high:.4g}] "
                             "(store 0-255 images as uint8, which is scaled, or divide them by 255 first)")
    return np.clip(image, 0.0, 1.0)


def _depth(path: Path, size: tuple[int, int]) -> np.ndarray:
    depth = _channels_first(_read(path), 1, size, path).astype(np.float32)
    return np.where(np.isfinite(depth) & (depth > 0), depth, np.float32(0.0))


def _normal(path: Path, size: tuple[int, int]) -> np.ndarray:
    normal = _channels_first(_read(path), 3, size, path).astype(np.float32)
    normal = np.where(np.isfinite(normal).all(0, keepdims=True), normal, np.float32(0.0))
    norm = np.sqrt((normal**2).sum(0))
    valid = norm > 1e-6
    if valid.any() and abs(float(np.median(norm[valid])) - 1.0) > 0.1:
        raise ValueError(f"{path} does not hold unit normals (median length {np.median(norm[valid]):.3f}); "
                         "normals stored in [0, 1] must be mapped to [-1, 1] first")
    # Renormalise away storage rounding; all-zero vectors stay invalid.
    return np.where(valid, normal / np.where(valid, norm, 1.0), np.float32(0.0)).astype(np.float32)


def _load_split(name: str, split_dir: Path, infix: str, num_classes: int, limit: int | None) -> MultiTaskDataset:
    if not split_dir.is_dir():
        raise FileNotFoundError(f"missing split folder {split_dir}")
    tasks = TASKS[name]
    folders = ["image"] + [FOLDERS[t] for t in tasks]
    files = {f: _numbered_files(split_dir / f) for f in folders}
    numbers = sorted(files["image"])
    for f in folders[1:]:
        if sorted(files[f]) != numbers:
            missing = sorted(set(numbers) - set(files[f]))[:5]
            extra = sorted(set(files[f]) - set(numbers))[:5]
            raise ValueError(
                f"{split_dir / f} has {len(files[f])} files for {len(numbers)} images in {split_dir / 'image'} "
                f"(missing {missing}, without image {extra})"
            )
    if not numbers:
        raise ValueError(f"no <n>.npy files in {split_dir / 'image'}")
    if limit is not None:
        numbers = numbers[:limit]

    images, targets = [], {t: [] for t in tasks}
    size = None
    for n in numbers:
        label = _label(files["label"][n], num_classes)
        if size is None:
            size = label.shape
        elif label.shape != size:
            raise ValueError(f"{files['label'][n]} has shape {label.shape}; earlier labels are {size}")
        images.append(_image(files["image"][n], size))
        targets["segmentation"].append(label)
        targets["depth"].append(_depth(files["depth"][n], size))
        if "normal" in tasks:
            targets["normal"].append(_normal(files["normal"][n], size))
    return MultiTaskDataset(
        name,
        tasks,
        torch.from_numpy(np.stack(images)),
        {t: torch.from_numpy(np.stack(v)) for t, v in targets.items()},
        [f"{name}-{infix}-{n}" for n in numbers],
        num_classes=num_classes,
    )


def load_npy_splits(spec: dict) -> tuple[MultiTaskDataset, MultiTaskDataset]:
    """(train, val) datasets of a preprocessed NYUv2 or Cityscapes folder; see the module docstring."""
    name = spec.get("name")
    if name not in TASKS:
        raise ValueError(f"unknown npy dataset {name!r}; known: {sorted(TASKS)}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {name!r} dataset spec; known: {sorted(SPEC_KEYS)}")
    if not spec.get("root"):
        raise ValueError(f"the {name!r} dataset spec needs a 'root' folder")
    root = Path(spec["root"])
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    num_classes = int(spec.get("num_classes") or NUM_CLASSES[name])
    limit = spec.get("limit")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be at least 1, got {limit!r}")
    limit = None if limit is None else int(limit)
    train, val = (_load_split(name, root / folder, infix, num_classes, limit) for folder, infix in SPLITS)
    return train, val
