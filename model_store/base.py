"""The contract every model store implements: immutable, numbered versions of one model,
each a safetensors weights file plus a JSON manifest.

A version, once written, never changes. Writing it again with the same job (or,
for a version no job produced, the same weights) is a no-op, so a job that runs
twice finds its own artifact; writing different content under an existing
version number is an error.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from unlearning.model import MultiTaskNet


class StoreError(RuntimeError):
    """A store operation that must not go through (conflicting put, missing version)."""


class IntegrityError(StoreError):
    """The weights on disk do not match the sha256 recorded in the manifest."""


class PurgedVersion(StoreError):
    """The version's weights were deleted (:meth:`ModelStore.purge`): they held erased data."""


@dataclass
class Manifest:
    """What a version is: where it came from, what was erased from it, how it scored."""

    model: str
    version: int
    parent: int | None
    sha256: str
    created_at: str
    model_config: dict
    dataset: dict
    deletions: list[str] = field(default_factory=list)  # request ids applied in this step
    deleted_cells: list[list[str]] = field(default_factory=list)  # [instance, task] erased in this step
    erased_cells: list[list[str]] = field(default_factory=list)  # cumulative over the lineage
    metrics: dict[str, Any] = field(default_factory=dict)
    job_id: str | None = None
    train_config: dict | None = None
    note: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class ModelStore(ABC):
    """Versioned checkpoints. Implementations: :class:`model_store.local.LocalModelStore`;
    a shared (object-store) backend implements the same methods."""

    @abstractmethod
    def put_version(
        self,
        model: MultiTaskNet,
        *,
        model_name: str,
        version: int,
        parent: int | None,
        dataset: dict,
        deletions: list[str] | None = None,
        deleted_cells: list | None = None,
        erased_cells: list | None = None,
        metrics: dict | None = None,
        job_id: str | None = None,
        train_config: dict | None = None,
        note: str | None = None,
    ) -> Manifest:
        """Write a version atomically and return its manifest (idempotent, see the module doc)."""

    @abstractmethod
    def load(self, model_name: str, version: int, device: str | torch.device = "cpu") -> tuple[MultiTaskNet, Manifest]:
        """The model of a version, its weights checked against the manifest's sha256."""

    @abstractmethod
    def manifest(self, model_name: str, version: int) -> Manifest:
        """The manifest of a version; :class:`StoreError` when there is none."""

    @abstractmethod
    def exists(self, model_name: str, version: int) -> bool:
        """Whether a complete version (weights and manifest) is stored."""

    @abstractmethod
    def verify(self, model_name: str, version: int) -> bool:
        """Recompute the weights' sha256 and compare it with the manifest."""

    @abstractmethod
    def discard(self, model_name: str, version: int) -> None:
        """Remove a version that failed :meth:`verify` (so it can be written again). Only
        for an artifact no version row points at: a published version never changes."""

    @abstractmethod
    def purge(self, model_name: str, version: int) -> bool:
        """Delete a version's weights for good (they hold data erased since), keeping its
        manifest: what the version was stays on record. Returns whether weights were
        deleted (False: already purged). :meth:`load` then raises :class:`PurgedVersion`."""

    @abstractmethod
    def versions(self, model_name: str, clean: bool = True) -> list[int]:
        """The stored version numbers of a model (a purged version's manifest counts),
        ascending; ``clean``: first remove what writes that died left behind."""

    @abstractmethod
    def uri(self, model_name: str, version: int) -> str:
        """Where a version lives, for the compliance record."""

    @abstractmethod
    def calibration(self, model_name: str) -> dict | None:
        """The model's stored calibration (JSON; see :meth:`put_calibration`), or None."""

    @abstractmethod
    def put_calibration(self, model_name: str, payload: dict) -> dict:
        """Store what is computed once per model lineage (the unlearning method's shadow
        scores of the first version's training cells). Written once, atomically: when one
        is stored already, that one is kept and returned."""

    def open_version(self, model_name: str, version: int, device: str | torch.device = "cpu") -> MultiTaskNet:
        """The model of a version (see :meth:`load`)."""
        return self.load(model_name, version, device)[0]

    def purged(self, model_name: str, version: int) -> bool:
        """Whether the version's manifest is stored without its weights (:meth:`purge`)."""
        return not self.exists(model_name, version) and version in self.versions(model_name, clean=False)

    def latest_version(self, model_name: str) -> int | None:
        found = self.versions(model_name)
        return found[-1] if found else None
