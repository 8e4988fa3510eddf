"""Datasets by name. A dataset spec is a plain dict so it can live in a model manifest:

    {"name": "indoor", "n_train": 160, "n_test": 48, "height": 48, "width": 64, "seed": 0}
    {"name": "nyuv2", "root": "/data/nyuv2"}

:func:`load_splits` returns ``(train, test)`` :class:`MultiTaskDataset` objects
with stable instance ids. Adding a dataset is one file and one line below.
"""
from __future__ import annotations

from .base import Batch, Cell, MultiTaskDataset

__all__ = ["Batch", "Cell", "MultiTaskDataset", "load_splits", "DATASETS", "SYNTHETIC_DATASETS", "canonical_json",
           "canonical_spec", "data_source", "dataset_key", "dataset_tasks", "load_reference"]

#: rendered by unlearning.data.renderer (its FLAVOUR_TASKS), any number of scenes; the others are read from files
SYNTHETIC_DATASETS = ("indoor", "street")
DATASETS = SYNTHETIC_DATASETS + ("nyuv2", "cityscapes")


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
    if name in SYNTHETIC_DATASETS:
        from .synthetic import load_synthetic

        return load_synthetic(spec, render_workers)
    if name in ("nyuv2", "cityscapes"):
        from .npy_format import load_npy_splits

        return load_npy_splits(spec)
    raise KeyError(f"unknown dataset {name!r}; known datasets: {list(DATASETS)}")


def load_reference(spec: dict, n: int, render_workers: int | str = 1) -> MultiTaskDataset:
    """``n`` held-out scenes of a synthetic dataset that are not in its test split: the
    renderer's test scenes ``n_test`` to ``n_test + n - 1`` (a scene is rendered from its
    own seed, so the test split, the first ``n_test``, is the same with or without them);
    only those are rendered. A held-out *reference* for a method (interference_aware's
    levels) apart from the test split, where the membership attack takes its non-members.
    Other datasets have no scenes to render: a ``ValueError`` says so."""
    name = _name(spec)
    if name not in SYNTHETIC_DATASETS:
        raise ValueError(f"reference scenes are rendered: the {name!r} dataset is not synthetic "
                         f"(synthetic: {list(SYNTHETIC_DATASETS)})")
    from .renderer import is_integer
    from .synthetic import SIZE_DEFAULTS, load_synthetic

    if not is_integer(n) or n <= 0:  # numpy's integers are integers, bools are not
        raise ValueError(f"the number of reference scenes must be a positive integer, got {n!r}")
    n_test = spec.get("n_test", SIZE_DEFAULTS["n_test"])
    if not is_integer(n_test):
        raise ValueError(f"'n_test' in the {name!r} dataset spec must be an integer, got {n_test!r}")
    n_test, n = int(n_test), int(n)
    return load_synthetic({**spec, "n_train": 0}, render_workers, test_scenes=range(n_test, n_test + n))[1]


def dataset_tasks(spec: dict) -> list[str]:
    """The tasks of the dataset ``spec`` names, without loading it (what ``load_splits(spec)``'s
    splits will have)."""
    name = _name(spec)
    if name in SYNTHETIC_DATASETS:
        from .renderer import FLAVOUR_TASKS

        return list(FLAVOUR_TASKS[name])
    if name in ("nyuv2", "cityscapes"):
        from .npy_format import TASKS

        return list(TASKS[name])
    raise KeyError(f"unknown dataset {name!r}; known datasets: {list(DATASETS)}")


def canonical_spec(spec: dict) -> dict:
    """``spec`` written one way: two specs that :func:`load_splits` reads as the same data
    give the same dict, and specs of different data different ones.

    - ``indoor``/``street``: every size written out (``n_train``, ``n_test``, ``height``,
      ``width``, ``seed``, integers); ``noise`` keeps only the fields of
      :class:`~unlearning.data.renderer.NoiseOptions` that differ from their defaults (as
      floats) and is left out when none does, so ``"clean"`` is every field at 0.0;
    - ``nyuv2``/``cityscapes``: ``root`` normalised lexically (:func:`os.path.normpath`:
      ``/data/nyu/`` and ``/data/./nyu`` are ``/data/nyu``; symlinks are not resolved, since
      the API and a worker may mount the data elsewhere, and a relative root stays relative),
      ``num_classes`` written out, ``limit`` written out (``None``: every file).

    Lenient: a value the loader would refuse (and a dataset it does not know) is kept as
    given, since specs are keyed before they are loaded (``{"name": "nyuv2"}`` from settings
    with no root); :func:`load_splits` is what refuses them."""
    import os

    from .renderer import is_integer

    name = _name(spec)
    out = dict(spec)
    if name in SYNTHETIC_DATASETS:
        from dataclasses import asdict

        from .renderer import NoiseOptions
        from .synthetic import SIZE_DEFAULTS, noise_options

        for key, default in SIZE_DEFAULTS.items():
            value = out.get(key, default)
            out[key] = int(value) if is_integer(value) else value
        try:
            noise = noise_options(spec)
        except (ValueError, TypeError):  # not a noise spec: kept as given, for the loader to refuse
            return out
        given, defaults = asdict(NoiseOptions.clean() if noise is None else noise), asdict(NoiseOptions())
        changed = {k: v for k, v in given.items() if v != defaults[k]}
        if changed:
            out["noise"] = changed
        else:
            out.pop("noise", None)
    elif name in ("nyuv2", "cityscapes"):
        from .npy_format import NUM_CLASSES

        root = out.get("root")
        if isinstance(root, os.PathLike):
            root = os.fspath(root)
        if isinstance(root, str) and root:
            out["root"] = os.path.normpath(root)
        for key, default in (("num_classes", NUM_CLASSES[name]), ("limit", None)):
            value = out.get(key)
            if value is None:
                out[key] = default
            elif is_integer(value):
                out[key] = int(value)
    return out


def canonical_json(spec: dict) -> str:
    """:func:`canonical_spec` as compact JSON with sorted keys: the text :func:`dataset_key`
    hashes, and what the service keys its loaded splits by."""
    import json

    return json.dumps(canonical_spec(spec), sort_keys=True, separators=(",", ":"))


def data_source(spec: dict) -> dict:
    """What ``spec``'s instances are, whatever it takes of them and however it renders or
    preprocesses them: a synthetic dataset's name and scene seed (an instance id names the
    same scene at any ``n_train``, ``n_test``, image size or noise), an npy dataset's name and
    root (any ``limit`` or ``num_classes``). Specs of one source hold the same people's data;
    :func:`dataset_key`, which tombstones are kept by, tells them apart when their splits
    differ. A dataset this module does not know is its own source (its canonical spec)."""
    canonical = canonical_spec(spec)
    name = canonical.get("name")
    if name in SYNTHETIC_DATASETS:
        return {"name": name, "seed": canonical.get("seed")}
    if name in ("nyuv2", "cityscapes"):
        return {"name": name, "root": canonical.get("root")}
    return canonical


def dataset_key(spec: dict) -> str:
    """A stable key for the data a spec describes (tombstones are recorded per key): the
    name and a hash of :func:`canonical_spec`, so specs of the same data written
    differently (``{"name": "indoor"}`` and the same with its sizes written out) share it."""
    import hashlib

    return f"{_name(spec)}-{hashlib.sha256(canonical_json(spec).encode()).hexdigest()[:12]}"
