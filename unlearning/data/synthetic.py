"""Synthetic multi-task datasets from the procedural renderer (``indoor``, ``street``).

Spec keys (all but ``name`` optional)::

    {"name": "indoor" | "street", "n_train": 160, "n_test": 48,
     "height": 48, "width": 64, "seed": 0,
     "noise": {"depth_sigma": ..., ...} | "clean"}

``noise`` overrides fields of :class:`~unlearning.data.renderer.NoiseOptions`
(unset fields keep their non-zero defaults); ``"clean"`` turns every noise
source off. Unknown keys are an error, since a mistyped option would otherwise
silently change a benchmark.

Images are float32 (3,H,W) in [0, 1] (not standardised). Targets follow the
task contracts: segmentation long (H,W) with -1 = ignore, depth float32
(1,H,W) with 0 = invalid, normal float32 (3,H,W) unit with all-zero = invalid.
Train scene ``i`` is rendered from seed ``(seed, 0, i)`` and test scene ``i``
from ``(seed, 1, i)``, so the splits never share a scene and growing
``n_train`` keeps the first scenes as they were.
"""
from __future__ import annotations

from .base import MultiTaskDataset
from .renderer import FLAVOUR_CLASSES, FLAVOUR_TASKS, NoiseOptions, is_integer, render_batch

SPEC_KEYS = {"name", "n_train", "n_test", "height", "width", "seed", "noise"}
#: what a spec that leaves a size or the seed out gets (unlearning.data.canonical_spec writes them out)
SIZE_DEFAULTS = {"n_train": 160, "n_test": 48, "height": 48, "width": 64, "seed": 0}
_TRAIN, _TEST = 0, 1


def noise_options(spec: dict) -> NoiseOptions | None:
    """The noise a spec asks for: defaults, overrides from ``spec["noise"]``, or None for ``"clean"``."""
    noise = spec.get("noise")
    if noise is None:
        return NoiseOptions()
    if noise == "clean":
        return None
    if not isinstance(noise, dict):
        raise ValueError(f"spec 'noise' must be a dict of NoiseOptions fields or 'clean', got {noise!r}")
    return NoiseOptions.from_dict(noise)  # fields not given keep their defaults


def load_synthetic(spec: dict, render_workers: int | str = 1,
                   test_scenes: range | None = None) -> tuple[MultiTaskDataset, MultiTaskDataset]:
    """Render the train and test splits a spec describes; same spec, identical tensors
    (for any ``render_workers``: processes of :func:`~unlearning.data.renderer.render_batch`).
    ``test_scenes``: render these test scenes instead of the first ``n_test`` (more
    held-out scenes beyond the test split, the same as a larger ``n_test`` renders them)."""
    name = spec.get("name")
    if name not in FLAVOUR_TASKS:
        raise ValueError(f"unknown synthetic dataset {name!r}; known: {sorted(FLAVOUR_TASKS)}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {name!r} dataset spec; known: {sorted(SPEC_KEYS)}")
    sizes = {}
    for key, default in SIZE_DEFAULTS.items():
        value = spec.get(key, default)
        # checked, not int()-ed: that turned 2.5 into 2, "3" into 3 and True into 1
        if not is_integer(value):
            raise ValueError(f"{key!r} in the {name!r} dataset spec must be an integer, got {value!r}")
        sizes[key] = int(value)
    if sizes["n_train"] < 0 or sizes["n_test"] < 0 or sizes["seed"] < 0:
        raise ValueError(f"n_train, n_test and seed must be non-negative, got {sizes}")
    if sizes["height"] < 2 or sizes["width"] < 2:
        # checked whatever n_train and n_test: empty splits used to pass a size no scene can have
        raise ValueError(f"height and width in the {name!r} dataset spec must be at least 2, "
                         f"got {sizes['height']}x{sizes['width']}")
    noise = noise_options(spec)
    tasks = FLAVOUR_TASKS[name]

    def split(split_id: int, scenes: range, prefix: str) -> MultiTaskDataset:
        seeds = [(sizes["seed"], split_id, i) for i in scenes]
        data = render_batch(name, seeds, sizes["height"], sizes["width"], noise, workers=render_workers)
        return MultiTaskDataset(
            name,
            tasks,
            data["image"],
            {t: data[t] for t in tasks},
            [f"{prefix}-{i:05d}" for i in scenes],
            num_classes=len(FLAVOUR_CLASSES[name]),
        )

    test = range(sizes["n_test"]) if test_scenes is None else test_scenes
    return split(_TRAIN, range(sizes["n_train"]), name), split(_TEST, test, f"{name}-test")
