"""Unlearning methods by name. Adding a method is one file and one line below.

Every method has the signature ``(model, data: UnlearnData, config: dict) -> (model, log)``.
"""
from __future__ import annotations

import importlib

from .base import Method, UnlearnData

# name -> module in this package exposing ``unlearn`` (and ``DEFAULTS``)
_MODULES = {
    "interference_aware": "interference_aware",
    "retrain": "retrain",
    "finetune": "finetune",
    "gradient_ascent": "gradient_ascent",
    "neggrad_plus": "neggrad_plus",
    "random_target": "random_target",
    "scrub": "scrub",
    "salun": "salun",
    "ssd": "ssd",
    "l1_sparse": "l1_sparse",
    "pcgrad": "pcgrad",
}

METHOD_NAMES = list(_MODULES)


def _module(name: str):
    if not isinstance(name, str) or name not in _MODULES:  # (a list was a TypeError: unhashable)
        raise KeyError(f"unknown unlearning method {name!r}; known methods: {METHOD_NAMES}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def get_method(name: str) -> Method:
    """The ``unlearn`` function of method ``name``; a clear error names the known ones."""
    return _module(name).unlearn


def method_defaults(name: str) -> dict:
    return dict(getattr(_module(name), "DEFAULTS", {}))


def method_choices(name: str) -> dict:
    """The values each of the method's string parameters takes (its module's ``CHOICES``;
    ``optimizer``, which the shared loops build, for every method that has one)."""
    from .loops import OPTIMIZERS

    module = _module(name)
    shared = {"optimizer": OPTIMIZERS} if "optimizer" in getattr(module, "DEFAULTS", {}) else {}
    return {**shared, **getattr(module, "CHOICES", {})}


def check_method(name: str, data: UnlearnData, config: dict | None = None) -> None:
    """Run the method's ``check(data, config)`` hook, if it has one: a ValueError for a
    configuration that does not fit this job's cells (what :mod:`.params` cannot know),
    raised before ``prepare`` and ``unlearn`` do any work."""
    hook = getattr(_module(name), "check", None)
    if hook is not None:
        hook(data, config)


def prepare_method(name: str, model, data: UnlearnData, config: dict | None = None) -> bool:
    """Run the method's ``prepare(model, data, config)`` hook, if it has one (returns
    whether it did). The hook fills ``data.cache`` with what depends only on the model
    version, so a caller that keeps the cache per version (the service, the benchmark)
    computes it once and outside any job's time; like ``unlearn``, it merges the
    method's ``DEFAULTS`` under ``config`` itself."""
    hook = getattr(_module(name), "prepare", None)
    if hook is None:
        return False
    hook(model, data, config)
    return True


def prepare_share(name: str, model, data: UnlearnData, config: dict | None = None) -> float:
    """The share, in [0, 1), of a job's work that the method's ``prepare`` hook will take on
    ``data.cache`` (its ``prepare_share(model, data, config)``, if it has one; else 0):
    a job gives the hook that part of its progress, and the method the rest."""
    hook = getattr(_module(name), "prepare_share", None)
    return 0.0 if hook is None else min(max(float(hook(model, data, config)), 0.0), 0.99)


__all__ = ["UnlearnData", "Method", "METHOD_NAMES", "get_method", "method_defaults", "method_choices", "check_method", "prepare_method",
           "prepare_share"]
