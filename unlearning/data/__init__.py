"""Datasets by name. A dataset spec is a plain dict so it can live in a model manifest:

    {"name": "indoor", "n_train": 160, "n_test": 48, "height": 48, "width": 64, "seed": 0}
    {"name": "nyuv2", "root": "/data/nyuv2"}

:func:`load_splits` returns ``(train, test)`` :class:`MultiTaskDataset` objects
with stable instance ids. Adding a dataset is one file and one line below.
"""
from __future__ import annotations

from .base import Batch, Cell, MultiTaskDataset

__all__ = ["Batch", "Cell", "MultiTaskDataset", "load_splits", "DATASETS", "dataset_key", "dataset_tasks"]

DATASETS = ("indoor", "street", "nyuv2", "cityscapes")


def _name(spec: dict):
    """``spec``'s dataset name; ``ValueError`` when ``spec`` is no dict (a bare name, say),
    which used to fail with an AttributeError the CLIs do not turn into their one-line error."""
    if not isinstance(spec, dict):
        raise ValueError(f"a dataset spec is a dict such as {{'name': 'indoor'}}, got {spec!r}")
    return spec.get("name")


def load_splits(spec: dict, render_workers: int | str = 1) -> tuple[MultiTaskDataset, MultiTaskDataset]:
    """The ``(train, test)`` splits of ``spec``. ``render_workers`` (synthetic datasets
    only): processes that render the scenes, ``"auto"`` by their size; same tensors for any."""
    name = _name(spec)
    if name in ("indoor", "street"):
        from .synthetic import load_synthetic

        return load_synthetic(spec, render_workers)
    if name in ("nyuv2", "cityscapes"):
        from .npy_format import load_npy_splits

        return load_npy_splits(spec)
    raise KeyError(f"unknown dataset {name!r}; known datasets: {list(DATASETS)}")


def dataset_tasks(spec: dict) -> list[str]:
    """The tasks of the dataset ``spec`` names, without loading it (what ``load_splits(spec)``'s
    splits will have)."""
    name = _name(spec)
    if name in ("indoor", "street"):
        from .renderer import FLAVOUR_TASKS

        return list(FLAVOUR_TASKS[name])
    if name in ("nyuv2", "cityscapes"):
        from .npy_format import TASKS

        return list(TASKS[name])
    raise KeyError(f"unknown dataset {name!r}; known datasets: {list(DATASETS)}")


def dataset_key(spec: dict) -> str:
    """A stable key for a dataset spec (tombstones are recorded per key)."""
    import hashlib
    import json

    body = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return f"{spec.get('name')}-{hashlib.sha256(body.encode()).hexdigest()[:12]}"
