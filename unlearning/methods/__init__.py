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


def get_method(name: str) -> Method:
    """The ``unlearn`` function of method ``name``; a clear error names the known ones."""
    if name not in _MODULES:
        raise KeyError(f"unknown unlearning method {name!r}; known methods: {METHOD_NAMES}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}").unlearn


def method_defaults(name: str) -> dict:
    get_method(name)
    return dict(getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), "DEFAULTS", {}))


def method_prepare(name: str):
    """The method's ``prepare(model, data, config)`` hook, or None: it fills ``data.cache``
    with what depends only on the model version, so a caller that keeps the cache per
    version (the service, the benchmark) computes it once and outside any job's time."""
    get_method(name)
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), "prepare", None)


__all__ = ["UnlearnData", "Method", "METHOD_NAMES", "get_method", "method_defaults", "method_prepare"]
