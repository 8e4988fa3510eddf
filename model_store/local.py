"""A model store on a local (or mounted) file system:

    {root}/{model}/v{version}/model.safetensors   weights (safetensors; never pickled)
    {root}/{model}/v{version}/config.json         architecture, so unlearning.model.load_model works on the folder
    {root}/{model}/v{version}/manifest.json       the Manifest, with the weights' sha256

A version is written into a temporary folder beside its final place and
renamed into it, so a reader never sees half a version. A writer killed before
the rename leaves its ``.tmp-*`` folder behind; :meth:`LocalModelStore.versions`
removes those older than ``STALE_TMP_S``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from unlearning.model import WEIGHTS_FILE, ModelConfig, MultiTaskNet, model_from_safetensors, save_model

from .base import IntegrityError, Manifest, ModelStore, PurgedVersion, StoreError

MANIFEST_FILE = "manifest.json"
CALIBRATION_FILE = "calibration.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
TMP_PREFIX = ".tmp-"
STALE_TMP_S = 3600.0  # far longer than any write takes: a temporary folder this old is a dead writer's


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalModelStore(ModelStore):
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _model_dir(self, model_name: str) -> Path:
        if not _NAME.fullmatch(model_name):  # the name becomes a path: no separators, no '..'
            raise StoreError(f"invalid model name {model_name!r}")
        return self.root / model_name

    def _dir(self, model_name: str, version: int) -> Path:
        if int(version) < 1:
            raise StoreError(f"invalid version {version!r}")
        return self._model_dir(model_name) / f"v{int(version)}"

    def uri(self, model_name: str, version: int) -> str:
        return self._dir(model_name, version).resolve().as_uri()

    def exists(self, model_name: str, version: int) -> bool:
        d = self._dir(model_name, version)
        return (d / MANIFEST_FILE).is_file() and (d / WEIGHTS_FILE).is_file()

    def versions(self, model_name: str, clean: bool = True) -> list[int]:
        d = self._model_dir(model_name)
        if not d.is_dir():
            return []
        if clean:
            self.remove_stale_tmp(model_name)
        found = []
        for child in d.iterdir():
            m = re.fullmatch(r"v(\d+)", child.name)
            if m and (child / MANIFEST_FILE).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def remove_stale_tmp(self, model_name: str, older_than_s: float = STALE_TMP_S) -> list[str]:
        """Remove the temporary files and folders of writes that died (older than
        ``older_than_s``); returns their names."""
        d = self._model_dir(model_name)
        cutoff = time.time() - older_than_s
        removed = []
        for child in d.iterdir() if d.is_dir() else ():
            try:
                if not child.name.startswith(TMP_PREFIX) or child.lstat().st_mtime >= cutoff:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            except FileNotFoundError:  # another process removed it first
                continue
            removed.append(child.name)
        return removed

    def manifest(self, model_name: str, version: int) -> Manifest:
        path = self._dir(model_name, version) / MANIFEST_FILE
        if not path.is_file():
            raise StoreError(f"no version {version} of model {model_name!r} in {self.root}")
        return Manifest.from_dict(json.loads(path.read_text()))

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
        final = self._dir(model_name, version)
        if self.exists(model_name, version):
            existing = self._same_or_conflict(model_name, version, job_id, model)
            if self.verify(model_name, version):
                return existing
            # this job's artifact, stored by another attempt, with weights that no longer
            # match its manifest: it is replaced, never handed on to be published
            self.discard(model_name, version)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"{TMP_PREFIX}v{version}-{uuid.uuid4().hex}"
        try:
            weights = save_model(model, tmp)
            data = weights.read_bytes()
            manifest = Manifest(
                model=model_name,
                version=int(version),
                parent=parent,
                sha256=sha256_bytes(data),
                created_at=datetime.now(timezone.utc).isoformat(),
                model_config=asdict(model.config),
                dataset=dict(dataset),
                deletions=list(deletions or []),
                deleted_cells=[list(c) for c in (deleted_cells or [])],
                erased_cells=[list(c) for c in (erased_cells or [])],
                metrics=json.loads(json.dumps(metrics or {}, default=float)),
                job_id=job_id,
                train_config=train_config,
                note=note,
            )
            # no sort_keys: the order of model_config["tasks"] is the model's head order
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(tmp)
            try:
                os.rename(tmp, final)  # atomic; fails when another writer got there first
            except OSError:
                if self.exists(model_name, version):
                    return self._same_or_conflict(model_name, version, job_id, model)
                raise
            _fsync_dir(final.parent)
            return manifest
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def calibration(self, model_name: str) -> dict | None:
        path = self._model_dir(model_name) / CALIBRATION_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def put_calibration(self, model_name: str, payload: dict) -> dict:
        directory = self._model_dir(model_name)
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / CALIBRATION_FILE
        if final.is_file():
            return json.loads(final.read_text())
        tmp = directory / f"{TMP_PREFIX}calibration-{uuid.uuid4().hex}"
        try:
            with open(tmp, "w") as fh:
                json.dump(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, final)  # atomic and fails if another writer got there first: the first one stands
            except FileExistsError:
                pass
            _fsync_dir(directory)
        finally:
            tmp.unlink(missing_ok=True)
        return json.loads(final.read_text())

    def _same_or_conflict(self, model_name: str, version: int, job_id: str | None, model: MultiTaskNet) -> Manifest:
        """An existing version: the same job (or, without a job, the same weights) is a no-op."""
        existing = self.manifest(model_name, version)
        if job_id is not None:
            if existing.job_id == job_id:
                return existing
            raise StoreError(
                f"version {version} of {model_name!r} already exists from job {existing.job_id!r}, not {job_id!r}"
            )
        if existing.job_id is None and existing.sha256 == _state_sha(model):
            return existing
        raise StoreError(f"version {version} of {model_name!r} already exists with different content")

    def _read_verified(self, model_name: str, version: int) -> tuple[bytes, Manifest]:
        manifest = self.manifest(model_name, version)
        path = self._dir(model_name, version) / WEIGHTS_FILE
        try:
            data = path.read_bytes()  # read once: the bytes checked are the bytes loaded
        except FileNotFoundError:
            raise PurgedVersion(f"{model_name} v{version}: its weights were purged (they held erased data); "
                                "only its manifest is kept") from None
        digest = sha256_bytes(data)
        if digest != manifest.sha256:
            raise IntegrityError(
                f"{model_name} v{version}: weights sha256 {digest} does not match the manifest's {manifest.sha256}"
            )
        return data, manifest

    def verify(self, model_name: str, version: int) -> bool:
        try:
            self._read_verified(model_name, version)
        except IntegrityError:
            return False
        return True

    def discard(self, model_name: str, version: int) -> None:
        final = self._dir(model_name, version)
        if not final.exists():
            return
        doomed = final.parent / f"{TMP_PREFIX}discarded-v{int(version)}-{uuid.uuid4().hex}"
        os.rename(final, doomed)  # atomic: readers see the version or nothing
        _fsync_dir(final.parent)
        shutil.rmtree(doomed, ignore_errors=True)

    def purge(self, model_name: str, version: int) -> bool:
        self.manifest(model_name, version)  # StoreError for a version that is not stored
        weights = self._dir(model_name, version) / WEIGHTS_FILE
        try:
            weights.unlink()  # atomic: readers see the weights or none
        except FileNotFoundError:
            return False
        _fsync_dir(weights.parent)
        return True

    def load(self, model_name: str, version: int, device: str | torch.device = "cpu") -> tuple[MultiTaskNet, Manifest]:
        data, manifest = self._read_verified(model_name, version)
        model = model_from_safetensors(ModelConfig(**manifest.model_config), data,
                                       self._dir(model_name, version) / WEIGHTS_FILE, device)
        return model.eval(), manifest


def _state_sha(model: MultiTaskNet) -> str:
    """The sha256 :func:`save_model` would produce for ``model`` (for the no-job idempotency check)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return sha256_bytes(save_model(model, d).read_bytes())
