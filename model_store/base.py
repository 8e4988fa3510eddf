"""The contract every model store implements: immutable, numbered versions of one model,
each a safetensors weights file plus a JSON manifest.

A version, once written, never changes. Writing it again with the same job (or,
for a version no job produced, the same weights) is a no-op, so a job that runs
twice finds its own artifact; writing different content under an existing
version number is an error.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import MISSING, asdict, dataclass, field
from datetime import datetime
from typing import Any

import torch

from unlearning.cli import is_sha256, short_repr as _short
from unlearning.model import MultiTaskNet


# The largest version number: the service's database holds versions in a 32-bit integer
# column (``app.schemas.MAX_VERSION``, the same bound; not imported from there, since
# ``model_store`` depends on ``unlearning`` only and ``app`` pulls in the web app).
MAX_VERSION = 2**31 - 1


class StoreError(RuntimeError):
    """A store operation that must not go through (conflicting put, missing version)."""


class IntegrityError(StoreError):
    """The weights on disk do not match the sha256 recorded in the manifest, are not a
    regular file (a link, a directory, a FIFO), or do not fit the manifest's architecture."""


class WrongArchitecture(IntegrityError):
    """Weights that match the manifest's sha256 but do not load as the model its
    ``model_config`` describes (other tensor names or shapes, an architecture too large to
    build): they are the bytes the manifest was written for, so what changed is its
    ``model_config``."""


class DamagedManifest(StoreError):
    """A version's manifest cannot be read: not a regular file, not UTF-8 JSON, not an
    object, a required field missing or of the wrong type, an invalid ``model_config``, or a
    ``model``/``version`` other than its folder's. The message names the file and what is wrong."""


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
    def from_dict(cls, data: dict, source: str = "manifest") -> "Manifest":
        """The manifest of the parsed JSON ``data`` (read from ``source``, which the errors
        name); unknown fields are ignored (written by a newer store). :class:`DamagedManifest`
        when ``data`` is not an object or a field is missing or of the wrong type."""
        if not isinstance(data, dict):
            raise DamagedManifest(f"{source}: a manifest is a JSON object, got {_json_type(data)}")
        missing = [f for f in _REQUIRED if f not in data]
        if missing:
            raise DamagedManifest(f"{source}: required fields missing: {', '.join(missing)}")
        for name, (check, expected) in _FIELD_CHECKS.items():
            if name in data and not check(data[name]):
                raise DamagedManifest(f"{source}: field {name!r} must be {expected}, got {_json_type(data[name])} "
                                      f"{_short(data[name])}")
        try:
            datetime.fromisoformat(data["created_at"])
        except ValueError:
            raise DamagedManifest(f"{source}: field 'created_at' is not an ISO 8601 time: "
                                  f"{_short(data['created_at'])}") from None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def valid_version(version, what: str = "version") -> int:
    """``version`` when it is a version number: an ``int`` (not a bool, not a float) in
    [1, :data:`MAX_VERSION`]; :class:`StoreError` otherwise."""
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise StoreError(f"invalid {what} {_short(version)}: a version is an int in [1, {MAX_VERSION}]")
    return int(version)


def _is_version(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_VERSION


def _is_cells(v) -> bool:
    """A list of ``[instance, task]`` pairs of strings: a pair of any other shape (``[instance]``)
    made every reader that unpacks cells fail, a purge of the model among them."""
    return isinstance(v, list) and all(
        isinstance(c, list) and len(c) == 2 and all(isinstance(x, str) for x in c) for c in v)


_REQUIRED = [n for n, f in Manifest.__dataclass_fields__.items() if f.default is MISSING and f.default_factory is MISSING]
_FIELD_CHECKS = {
    "model": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "version": (_is_version, f"an integer in [1, {MAX_VERSION}]"),
    "parent": (lambda v: v is None or _is_version(v), f"null or an integer in [1, {MAX_VERSION}]"),
    "sha256": (is_sha256, "64 lowercase hex digits"),
    "created_at": (lambda v: isinstance(v, str), "a string"),
    "model_config": (lambda v: isinstance(v, dict), "an object"),
    "dataset": (lambda v: isinstance(v, dict), "an object"),
    "deletions": (lambda v: isinstance(v, list) and all(isinstance(r, str) for r in v), "a list of strings"),
    "deleted_cells": (_is_cells, "a list of [instance, task] pairs of strings"),
    "erased_cells": (_is_cells, "a list of [instance, task] pairs of strings"),
    "metrics": (lambda v: isinstance(v, dict), "an object"),
    "job_id": (lambda v: v is None or isinstance(v, str), "null or a string"),
    "train_config": (lambda v: v is None or isinstance(v, dict), "null or an object"),
    "note": (lambda v: v is None or isinstance(v, str), "null or a string"),
}


def _json_type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


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
        """Write a version atomically and return its manifest (idempotent, see the module doc).
        ``version`` and ``parent`` are ints in [1, :data:`MAX_VERSION`] (:class:`StoreError`
        otherwise); a purged version is never written again (:class:`PurgedVersion`)."""

    @abstractmethod
    def load(self, model_name: str, version: int, device: str | torch.device = "cpu") -> tuple[MultiTaskNet, Manifest]:
        """The model of a version, its weights checked against the manifest's sha256."""

    @abstractmethod
    def manifest(self, model_name: str, version: int) -> Manifest:
        """The manifest of a version; :class:`StoreError` when there is none,
        :class:`DamagedManifest` (naming the file) when it cannot be read, lacks a field, or
        records another model or version than the one asked for."""

    @abstractmethod
    def exists(self, model_name: str, version: int) -> bool:
        """Whether a complete version (weights and manifest) is stored."""

    def verify(self, model_name: str, version: int) -> bool:
        """Recompute the weights' sha256 and compare it with the manifest: False when they
        differ, when they do not fit the manifest's architecture (what :meth:`load` would
        refuse), when the weights are not a regular file, or when the manifest is damaged
        (:class:`DamagedManifest`); :class:`PurgedVersion` for a purged version,
        :class:`StoreError` for one that is not stored. :meth:`weights_damage` says which."""
        return self.weights_damage(model_name, version) is None

    def weights_damage(self, model_name: str, version: int) -> StoreError | None:
        """What :meth:`verify` answers False for, as :meth:`check_weights` raises it; None when
        the version passes."""
        try:
            self.check_weights(model_name, version)
        except (IntegrityError, DamagedManifest) as exc:
            return exc
        return None

    @abstractmethod
    def check_weights(self, model_name: str, version: int) -> None:
        """:meth:`verify`, raising what it answers False for: :class:`IntegrityError` for weights
        that are not a regular file or do not match the manifest's sha256,
        :class:`WrongArchitecture` (one) for weights that match it but do not fit its
        ``model_config``, :class:`DamagedManifest` for a manifest that cannot be read or whose
        ``model_config`` is not an architecture."""

    @abstractmethod
    def discard(self, model_name: str, version: int, strict: bool = False) -> None:
        """Remove a version that failed :meth:`verify` (so it can be written again). Only
        for an artifact no version row points at: a published version never changes.
        ``strict`` (a purge): :class:`StoreError` when anything of it could not be deleted."""

    @abstractmethod
    def discard_if_damaged(self, model_name: str, version: int) -> bool:
        """Discard a stored version only if its weights do not match its manifest or its
        manifest is damaged (:class:`DamagedManifest`), checking and discarding as one step
        against concurrent writers of the version (another attempt of the same job that has
        just replaced a damaged copy with a good one keeps it). Returns whether it discarded.
        A version that is not stored, or was purged (manifest kept), is left alone (False).
        Only for an artifact no version row points at, as :meth:`discard`."""

    @abstractmethod
    def purge(self, model_name: str, version: int) -> bool:
        """Delete a version's weights for good (they hold data erased since), keeping its
        manifest: what the version was stays on record. Returns whether weights were
        deleted (False: already purged). :meth:`load` then raises :class:`PurgedVersion`."""

    def remove_leftovers(self, model_name: str) -> list[str]:
        """Remove what writes that died left in the model's part of the store, whatever its
        age (a purge runs it: a dead writer's temporary copy holds weights or scores that may
        hold erased data); returns their names. :class:`StoreError` for one that stays. A
        store whose writes leave nothing behind has nothing to remove."""
        return []

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

    @abstractmethod
    def replace_calibration(self, model_name: str, payload: dict) -> None:
        """Replace the stored calibration atomically (readers see the old one or the new one):
        only to take out what may no longer be kept (the scores of erased cells)."""

    def check_free(self, model_name: str, version: int) -> None:
        """Raise what :meth:`put_version` of a version that is not stored would raise for its
        place before writing anything (:class:`PurgedVersion`, or :class:`StoreError` naming
        what occupies it), so a caller can ask before an hour of training. Nothing when the
        place is free or the version is stored (a put then compares). A backend whose places
        cannot be occupied otherwise has nothing to check."""

    def open_version(self, model_name: str, version: int, device: str | torch.device = "cpu") -> MultiTaskNet:
        """The model of a version (see :meth:`load`)."""
        return self.load(model_name, version, device)[0]

    def purged(self, model_name: str, version: int) -> bool:
        """Whether the version's manifest is stored without its weights (:meth:`purge`)."""
        return not self.exists(model_name, version) and version in self.versions(model_name, clean=False)

    def latest_version(self, model_name: str) -> int | None:
        found = self.versions(model_name)
        return found[-1] if found else None
