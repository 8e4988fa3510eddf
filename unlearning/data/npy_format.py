"""Loader for the common preprocessed NYUv2 / Cityscapes layout of ``.npy`` files::

    {root}/{train,val}/image/<n>.npy    (H,W,3) or (3,H,W); uint8 is scaled to [0, 1], float must be in it
    {root}/{train,val}/label/<n>.npy    (H,W) (or a singleton channel); float or int class ids, -1 = ignore
    {root}/{train,val}/depth/<n>.npy    (H,W) (or a singleton channel); 0 = invalid
    {root}/{train,val}/normal/<n>.npy   (H,W,3) or (3,H,W) unit vectors; nyuv2 only

Spec: ``{"name": "nyuv2" | "cityscapes", "root": path, "num_classes": 13 | 7,
"limit": None}``. ``num_classes`` (default per dataset) and ``limit`` are
positive integers; ``limit`` keeps the first files (numerically) of each split.
The ``val`` split is returned as the test set; both splits must share one
image size. Instance ids (what an erasure names) are ``<name>-train-<n>`` and
``<name>-val-<n>`` with the file's number: ``nyuv2-train-7`` for ``train/image/007.npy``. Files are read with ``allow_pickle=False``: nothing is ever unpickled.

Values: labels are integer or float class ids; a negative or NaN label means
"ignore" (stored as -1), any other label must be a whole number below
``num_classes`` (2.5, +inf or 1e30 are refused, not rounded or wrapped). Depth
is in metres, as floating-point numbers (integer depth, raw sensor units, is
refused); depth that is 0, negative, NaN or infinite marks an invalid pixel, as does a normal
with a NaN, infinite or all-zero vector; the other normals must be unit
vectors: a map whose median length is off 1 by over 0.1, or where more than 1%
of them have a length off 1 by over 0.5, is refused, and the others are
renormalised to 1 (a bilinearly resized map's edge pixels among them). A finite value too large for float32
(float64 depth of 1e300, say) is refused rather than turned into an invalid
pixel by the cast. Bool, complex and string arrays are refused everywhere;
so are empty images and ambiguous numbering (``2.npy`` next to ``002.npy``).
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import numpy as np
import torch

from .base import MultiTaskDataset

TASKS = {"nyuv2": ("segmentation", "depth", "normal"), "cityscapes": ("segmentation", "depth")}
NUM_CLASSES = {"nyuv2": 13, "cityscapes": 7}
FOLDERS = {"segmentation": "label", "depth": "depth", "normal": "normal"}
SPEC_KEYS = {"name", "root", "num_classes", "limit"}
SPLITS = (("train", "train"), ("val", "val"))  # (folder, instance-id infix)
_NUMBERED = re.compile(r"([0-9]+)\.npy")  # fullmatch: ASCII digits only (\d took '٢'), no trailing newline


def _numbered_files(folder: Path) -> dict[int, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"missing folder {folder}")
    files: dict[int, Path] = {}
    # Sorted so that the error below names the same pair whatever the directory order.
    for path in sorted(folder.iterdir()):
        if m := _NUMBERED.fullmatch(path.name):
            n = int(m.group(1))
            if n in files:
                # Which one wins would depend on directory order, and the image, label and
                # depth of one sample could then come from different files.
                raise ValueError(f"{files[n]} and {path} both number sample {n}; keep one of them")
            files[n] = path
    return files


def _regular_file(path: Path) -> None:
    """Refuse (ValueError naming it) what is not a regular file, links followed: what an open
    would read. A FIFO (or a link to one) blocked np.load forever; a device or a socket is no
    array either."""
    try:
        kind = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not stat.S_ISREG(kind):
        raise ValueError(f"cannot read {path}: it is not a regular file")


def _read(path: Path) -> np.ndarray:
    _regular_file(path)
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # a corrupt file or a pickled object array: say which file
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(array, np.ndarray):
        # np.load opens an .npz archive whatever the file's name; it has no dtype or shape,
        # so it used to fail later with an AttributeError naming no file
        array.close()
        raise ValueError(f"cannot read {path}: it is an .npz archive, not a single .npy array")
    return array


def _check_numeric(array: np.ndarray, path: Path, what: str) -> None:
    """Refuse what ``astype`` would convert badly: strings (a bare error naming no file),
    complex (the imaginary part silently dropped) and bool (True/False are no measurements)."""
    # by kind: numpy counts timedelta64 among the integers, and astype read its values as numbers
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{path}: {what} must be an integer or float array, this one is {array.dtype}")


def _float32(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    """``array`` as float32; a finite value beyond float32's range is refused, since the cast
    would make it infinite and so, silently, an invalid pixel."""
    _check_numeric(array, path, what)
    with np.errstate(over="ignore"):  # reported below, with the file
        cast = array.astype(np.float32)
    if array.dtype.itemsize > 4 and np.issubdtype(array.dtype, np.floating):
        overflow = np.isfinite(array) & ~np.isfinite(cast)
        if overflow.any():
            raise ValueError(f"{path}: {what} holds {array[overflow].flat[0]:.4g}, beyond the float32 range "
                             f"(|x| <= {np.finfo(np.float32).max:.4g}); check its units")
    return cast


def _channels_first(array: np.ndarray, channels: int, size: tuple[int, int], path: Path) -> np.ndarray:
    """(C,H,W) from an (H,W,C), (C,H,W) or, for one channel, (H,W) array of spatial ``size``."""
    if channels == 1 and array.shape == size:
        return array[None]
    if array.shape == (channels, *size):
        return array
    if array.shape == (*size, channels):
        return np.moveaxis(array, -1, 0)
    raise ValueError(f"{path} has shape {array.shape}; expected {(channels, *size)} or {(*size, channels)}")


def _label(path: Path, num_classes: int, sizes: list[tuple[int, int]] = ()) -> np.ndarray:
    """The (H,W) int64 class map of ``path`` (-1 where ignored). A one-channel (1,H,W) or
    (H,W,1) map is squeezed; where both ends are 1, as in a one-pixel-tall (1,W,1), the
    reading whose shape is in ``sizes`` (its image's) is taken."""
    array = _read(path)
    if array.dtype == np.bool_:
        raise ValueError(f"{path}: a bool label map is ambiguous (a mask, or classes 0 and 1?); "
                         "store class ids as integers")
    _check_numeric(array, path, "a label map")
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        readings = ([array.shape[1:]] if array.shape[0] == 1 else []) + \
            ([array.shape[:-1]] if array.shape[-1] == 1 else [])
        array = array.reshape(next((r for r in readings if r in sizes), readings[0]))
    if array.ndim != 2:
        raise ValueError(f"{path} has shape {array.shape}; a label map is (H,W)")
    if np.issubdtype(array.dtype, np.integer):
        # Compared as integers: int64 near its limit or uint64 would not survive a float round trip.
        ignore = array < 0
        high = int(array.max()) if array.size else -1  # initial=-1 would overflow a uint8
    else:
        array = array.astype(np.float64)
        # Negative (-inf included) or NaN labels mean "ignore" in this format.
        ignore = np.isnan(array) | (array < 0)
        kept = array[~ignore]
        # Checked before the int64 cast, which would round 2.5 and wrap 1e19 to a negative label.
        fractional = kept[kept != np.floor(kept)]  # +inf is whole here: the range check refuses it
        if fractional.size:
            raise ValueError(f"{path} has label {fractional[0]:.6g}, not a whole number; labels are class ids "
                             "(resize label maps with nearest-neighbour, not interpolation)")
        high = float(kept.max(initial=-1.0))
    if high >= num_classes:
        # A float label here is whole (or +inf): "13", not "13.0"; "1e+30", not 31 digits.
        shown = str(int(high)) if isinstance(high, int) or high < 2**53 else f"{high:.6g}"
        raise ValueError(
            f"{path} has label {shown} but the dataset has "
            f"{num_classes} classes (ignore must be stored as -1; if the dataset has more classes, set num_classes "
            "in the dataset spec, or --num-classes of `unlearnd train`)"
        )
    # Every kept label is now a whole number in [0, num_classes): the int64 cast is exact.
    return np.where(ignore, -1, np.where(ignore, 0, array).astype(np.int64))


def _image(array: np.ndarray, path: Path, size: tuple[int, int]) -> np.ndarray:
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


def _image_sizes(image: np.ndarray) -> list[tuple[int, int]]:
    """The (H,W) an RGB image's shape can be read as: (H,W,3), (3,H,W) or both."""
    sizes = []
    if image.ndim == 3 and image.shape[-1] == 3:
        sizes.append(image.shape[:2])
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[1:] not in sizes:
        sizes.append(image.shape[1:])
    return sizes


def _first_size(image: np.ndarray, image_path: Path, label: np.ndarray, label_path: Path) -> tuple[int, int]:
    """The (H,W) of a split, from its first image and label.

    The label's shape is kept where the image agrees with it. Where a well-formed image
    disagrees, the label is named: the first image, depth and normals are checked against
    this size, so taking a bad first label's shape would put the blame on them."""
    if image.size == 0:
        # Refused here: an empty split would fail later inside a torch reduction, naming no file.
        raise ValueError(f"{image_path} is empty (shape {image.shape})")
    sizes = _image_sizes(image)
    if not sizes or label.shape in sizes:
        return label.shape  # an ill-shaped image is reported by _image against the label's size
    raise ValueError(f"{label_path} has shape {label.shape} but {image_path}, of shape {image.shape}, is "
                     + " or ".join(f"{h}x{w}" for h, w in sizes) + " pixels; a label map must match its image")


def _depth(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Depth in metres, as floats: integer depth is refused, since raw sensor millimetres
    (uint16 3000 for 3 m) or disparity x 256 read as metres silently scale the depth loss
    and its absolute error by 1000."""
    array = _read(path)
    if array.dtype.kind in "iu":  # by kind, as _check_numeric: timedelta64 is one of numpy's integers
        raise ValueError(f"{path} holds {array.dtype} depth; depth is read as floating-point metres (integers are "
                         "raw units: millimetres, disparity x 256): convert it, e.g. millimetres / 1000 as float32")
    depth = _channels_first(_float32(array, path, "depth"), 1, size, path)
    return np.where(np.isfinite(depth) & (depth > 0), depth, np.float32(0.0))


# The unit-normal checks. The median length of the valid (non-zero, finite) vectors must be
# within MEDIAN_TOLERANCE of 1: normals stored in [0, 1] have lengths of 0.5-1.5 spread around
# ~1.1. And at most NORMAL_OFF_SHARE of them may be off 1 by more than NORMAL_LENGTH_TOLERANCE:
# a minority of another scale (3 rows in 8 of length 5) passed the median. The bound is loose on
# purpose: a map resized bilinearly averages unit vectors at object edges (two at 90 degrees
# give 0.71), and such edge pixels are renormalised, not refused.
MEDIAN_TOLERANCE = 0.1
NORMAL_LENGTH_TOLERANCE = 0.5
NORMAL_OFF_SHARE = 0.01


def _normal(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The (3,H,W) unit normals of ``path``, all-zero where invalid (a zero, NaN or infinite
    vector); refused when they are not unit vectors (the constants above)."""
    normal = _channels_first(_float32(_read(path), path, "a normal map"), 3, size, path)
    normal = np.where(np.isfinite(normal).all(0, keepdims=True), normal, np.float32(0.0))
    norm = np.sqrt((normal**2).sum(0))
    valid = norm > 1e-6
    if valid.any():
        median = float(np.median(norm[valid]))
        if abs(median - 1.0) > MEDIAN_TOLERANCE:
            raise ValueError(f"{path} does not hold unit normals (median length {median:.3f}); "
                             "normals stored in [0, 1] must be mapped to [-1, 1] first")
        off, count = int((np.abs(norm[valid] - 1.0) > NORMAL_LENGTH_TOLERANCE).sum()), int(valid.sum())
        if off > NORMAL_OFF_SHARE * count:
            raise ValueError(f"{path} does not hold unit normals: {off} of its {count} non-zero vectors "
                             f"({off / count:.1%}; at most {NORMAL_OFF_SHARE:.0%} may be) have a length off 1 by "
                             f"more than {NORMAL_LENGTH_TOLERANCE} (median length {median:.3f}); a pixel without "
                             "a normal is stored as a zero vector")
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

    # filled in place, each array allocated once the first sample gives its shape: stacking
    # lists of per-file arrays held every sample twice at the end
    arrays: dict[str, np.ndarray] = {}

    def put(key: str, i: int, value: np.ndarray) -> None:
        if key not in arrays:
            arrays[key] = np.empty((len(numbers), *value.shape), value.dtype)
        arrays[key][i] = value  # (shapes checked against the split's size; dtypes fixed by the readers)

    size = None
    for i, n in enumerate(numbers):
        image = _read(files["image"][n])
        label = _label(files["label"][n], num_classes, [size] if size is not None else _image_sizes(image))
        if size is None:
            size, first = _first_size(image, files["image"][n], label, files["label"][n]), n
        elif label.shape != size:
            raise ValueError(f"{files['label'][n]} has shape {label.shape} but the split's first label, "
                             f"{files['label'][first].name}, is {size}")
        put("image", i, _image(image, files["image"][n], size))
        put("segmentation", i, label)
        put("depth", i, _depth(files["depth"][n], size))
        if "normal" in tasks:
            put("normal", i, _normal(files["normal"][n], size))
    return MultiTaskDataset(
        name,
        tasks,
        torch.from_numpy(arrays["image"]),
        {t: torch.from_numpy(arrays[t]) for t in tasks},
        [f"{name}-{infix}-{n}" for n in numbers],
        num_classes=num_classes,
    )


def _positive_int(spec: dict, key: str, name: str) -> int | None:
    """``spec[key]`` as an int, None when absent or None. Checked, not ``int()``-ed: that
    would turn 2.7 into 2 and True into 1, and a string into an error naming no key."""
    value = spec.get(key)
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{key!r} in the {name!r} dataset spec must be a positive integer, got {value!r}")
    return int(value)


def npy_split_sizes(spec: dict) -> list[tuple[str, int, int]] | None:
    """``[(split folder, samples, pixels a sample)]`` of the npy dataset ``spec``, from the
    folder listing and the header of each split's first image alone (nothing is loaded), for
    the memory check before loading (:func:`unlearning.resources.data_needs`); None when
    they cannot be told so (the loader names what is wrong). An image of shape ``(H, W, 3)``
    or ``(3, H, W)`` counts ``H * W`` pixels, one of ``(H, W)`` all of them."""
    try:
        root, limit = Path(spec["root"]), _positive_int(spec, "limit", spec["name"])
        sizes = []
        for folder, _ in SPLITS:
            files = _numbered_files(root / folder / "image")
            if not files:
                return None
            first = files[min(files)]
            _regular_file(first)  # a FIFO would block the open for ever
            with open(first, "rb") as f:
                fmt = np.lib.format
                read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
                shape = read(f)[0]  # (shape, fortran order, dtype)
            pixels = int(np.prod(shape, dtype=object))
            if len(shape) == 3 and 3 in (shape[0], shape[-1]):
                pixels //= 3
            sizes.append((folder, min(len(files), limit) if limit else len(files), pixels))
        return sizes
    except (KeyError, TypeError, ValueError, OSError):
        return None


def load_npy_splits(spec: dict) -> tuple[MultiTaskDataset, MultiTaskDataset]:
    """(train, val) datasets of a preprocessed NYUv2 or Cityscapes folder; see the module docstring."""
    name = spec.get("name")
    if name not in TASKS:
        raise ValueError(f"unknown npy dataset {name!r}; known: {sorted(TASKS)}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {name!r} dataset spec; known: {sorted(SPEC_KEYS)}")
    root = spec.get("root")
    if root is None or (isinstance(root, str) and not root):
        raise ValueError(f"the {name!r} dataset spec needs a 'root' folder")
    if not isinstance(root, (str, os.PathLike)):
        raise ValueError(f"'root' in the {name!r} dataset spec must be a folder path, got {root!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist")
    num_classes = _positive_int(spec, "num_classes", name) or NUM_CLASSES[name]
    limit = _positive_int(spec, "limit", name)
    train, val = (_load_split(name, root / folder, infix, num_classes, limit) for folder, infix in SPLITS)
    # Caught here, not by the first unlearning run after a successful training.
    if train.images.shape[-2:] != val.images.shape[-2:]:
        raise ValueError(f"{root / 'train'} images are {tuple(train.images.shape[-2:])} but {root / 'val'} images are "
                         f"{tuple(val.images.shape[-2:])}; both splits must share one size")
    return train, val
