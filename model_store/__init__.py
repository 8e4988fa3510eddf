"""Versioned model checkpoints: safetensors weights plus a JSON manifest per version.

``ModelStore`` is the contract (a shared store implements it later);
``LocalModelStore`` keeps versions in a directory tree. Depends on
``unlearning`` only.
"""
from __future__ import annotations

from pathlib import Path

from .base import (MAX_VERSION, DamagedManifest, IntegrityError, Manifest, ModelStore, PurgedVersion, StoreError,
                   WrongArchitecture)
from .local import LocalModelStore


def store_for(location: str | Path) -> ModelStore:
    """The store for a configured location (a local directory today)."""
    return LocalModelStore(location)


__all__ = ["Manifest", "ModelStore", "LocalModelStore", "StoreError", "IntegrityError", "PurgedVersion",
           "DamagedManifest", "WrongArchitecture", "MAX_VERSION", "store_for"]
