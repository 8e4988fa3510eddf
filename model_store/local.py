"""A model store on a local (or mounted) file system:

    {root}/{model}/v{version}/model.safetensors   weights (safetensors; never pickled)
    {root}/{model}/v{version}/config.json         architecture, so unlearning.model.load_model works on the folder
    {root}/{model}/v{version}/manifest.json       the Manifest, with the weights' sha256

    {root}/{model}/.lock                          lock file (see below); never removed

A version is written into a temporary folder beside its final place and
renamed into it, so a reader never sees half a version. A writer killed before
the rename leaves its ``.tmp-*`` folder behind; :meth:`LocalModelStore.versions`
removes those older than ``STALE_TMP_S`` (one it cannot remove is logged and left).

Writers of a model (:meth:`~LocalModelStore.put_version`, :meth:`~LocalModelStore.discard`,
:meth:`~LocalModelStore.discard_if_damaged`, :meth:`~LocalModelStore.purge` and the
calibration's writers) hold an
exclusive ``fcntl.flock`` on ``{root}/{model}/.lock`` (``LOCK_FILE``) while they check and
change a version, so threads and processes sharing the store never interleave there: a
damaged copy checked by one attempt of a job cannot be replaced by another attempt's good
copy before the first discards it. Readers take no lock. A writer holds the lock for the
whole life of its temporary folder, so the stale-tmp cleanup, which takes it without waiting
(and cleans nothing while a writer holds it), never removes a live writer's. The lock file is
not a version (``versions`` counts only ``v<number>`` folders) and not a temporary file (the
stale-tmp cleanup removes only ``.tmp-*``); it is never deleted, since deleting a lock file that
another process holds or is about to open would let two writers in at once.

The store writes only regular files and folders: weights or a manifest that is a link,
a directory or any other special file is refused (:class:`IntegrityError`,
:class:`DamagedManifest`), never followed.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import numbers
import os
import re
import shutil
import stat
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from unlearning.jsonio import loads_strict
from unlearning.model import (WEIGHTS_FILE, ModelConfig, MultiTaskNet, fitting_state, model_config_from,
                              model_from_safetensors, save_model, saved_state)

from .base import (MAX_VERSION, DamagedManifest, IntegrityError, Manifest, ModelStore, PurgedVersion, StoreError,
                   WrongArchitecture, _is_cells, valid_version)

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
CALIBRATION_FILE = "calibration.json"
LOCK_FILE = ".lock"  # in a model's folder: writers' flock (see the module doc); never removed
_VERSION_DIR = re.compile(r"v([1-9][0-9]*)")  # ASCII digits only, no leading zero: one folder per number
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
TMP_PREFIX = ".tmp-"
STALE_TMP_S = 3600.0  # far longer than any write takes: a temporary folder this old is a dead writer's


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _NotRegular(Exception):
    """What is at a path that should be a regular file (a link, a directory, ...)."""


def _what(path: Path, mode: int) -> str:
    if stat.S_ISLNK(mode):
        try:
            return f"a symbolic link to {os.readlink(path)}"
        except OSError:
            return "a symbolic link"
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file (links are not followed, and a FIFO is
    never opened for a blocking read); ``FileNotFoundError`` when nothing is there,
    :class:`_NotRegular` (saying what is there) otherwise."""
    try:
        st = os.lstat(path)
    except NotADirectoryError:
        raise FileNotFoundError(errno.ENOENT, "not found", str(path)) from None
    if not stat.S_ISREG(st.st_mode):
        raise _NotRegular(_what(path, st.st_mode))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a link since the lstat
            raise _NotRegular("a symbolic link") from None
        raise
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):  # replaced since the lstat
            raise _NotRegular(_what(path, st.st_mode))
        return fh.read()


def _read_calibration(path: Path) -> dict | None:
    """The calibration stored at ``path`` (None when there is none); :class:`StoreError` naming
    it when it is not a regular file (a link would be read through, and a redaction would
    replace the link and leave the scores in its target) or not a JSON object."""
    try:
        raw = _read_regular(path)
    except FileNotFoundError:
        return None
    except _NotRegular as exc:
        raise StoreError(f"{path} is {exc}, not a regular file: the service neither reads nor redacts scores "
                         "through it; put the calibration file itself there, or remove it to calibrate again") from None
    try:
        value = loads_strict(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StoreError(f"{path} is damaged (not JSON: {exc}); remove it to calibrate again") from None
    if not isinstance(value, dict):
        raise StoreError(f"{path} is damaged (not a JSON object); remove it to calibrate again")
    return value


def _json_value(value, where: str, depth: int = 0):
    """``value`` as strict JSON (for the manifest's metrics), by this rule: strings, bools,
    None and ints stay as they are; a finite float stays, NaN and the infinities become
    None; other real numbers (numpy scalars, fractions) become an int when integral, else a
    float (non-finite: None); an object with ``.item()`` giving one number (a one-element
    tensor or array) becomes that number; dicts (string or int keys, int keys as strings)
    and lists or tuples are converted item by item. Anything else (a datetime, an arbitrary
    object) is a :class:`StoreError` naming ``where`` (the metric's key path)."""
    if depth > 100:
        raise StoreError(f"{where}: nested too deep for the manifest")
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if isinstance(k, numbers.Integral) and not isinstance(k, bool):
                k = str(int(k))
            elif not isinstance(k, str):
                raise StoreError(f"{where}: key {k!r} is not a string; manifest metrics are JSON")
            out[k] = _json_value(v, f"{where}[{k!r}]", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    item = getattr(value, "item", None)
    if callable(item):
        try:
            number = item()
        except (ValueError, RuntimeError, TypeError):
            number = None
        if isinstance(number, numbers.Real):
            return _json_value(number, where, depth + 1)
    raise StoreError(f"{where} is {type(value).__name__} {value!r:.60}, not a JSON value (a number, string, bool, "
                     "null, list or object): convert it before storing it in the manifest")


# What opening or fsyncing a directory answers where directories cannot be synced (as PostgreSQL's
# fsync_fname reads them): a system that opens no directory (EISDIR, EACCES), one or a file system
# that syncs none (EINVAL: Linux on CIFS; EBADF: NetBSD on a read-only descriptor; EISDIR: HP-UX;
# ENOTSUP). Anything else (EIO, ENOSPC) is a write that may not last, and is raised.
_DIR_OPEN_UNSUPPORTED = {errno.EISDIR, errno.EACCES}
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.EBADF, errno.EISDIR, errno.ENOTSUP, errno.EOPNOTSUPP}


def _fsync_dir(path: Path) -> None:
    """Make the entries of the folder ``path`` (a rename, a file created or deleted) durable;
    nothing where directories cannot be synced, the OSError (naming ``path``) otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _DIR_OPEN_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise OSError(exc.errno, f"{exc.strerror} (syncing the folder)", str(path)) from None
    finally:
        os.close(fd)


def _strict_calibration(payload: dict) -> dict:
    """``payload`` as strict JSON: a score that is not a finite number (``shadow_scores``
    writes NaN for a cell it could not score) is dropped from its table, which the engine
    reads as unscored, exactly as it reads NaN; any other non-finite number becomes null.
    Both writers store this, so a calibration written with a NaN can still be redacted."""
    out = {}
    for key, value in payload.items():
        if key in ("full", "partial") and isinstance(value, dict):
            table = {}
            for instance, scores in value.items():
                kept = {t: v for t, v in scores.items()
                        if isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)} \
                    if isinstance(scores, dict) else scores
                if kept:
                    table[instance] = kept
            out[key] = table
        else:
            out[key] = _json_value(value, f"calibration[{key!r}]")
    return out


class LocalModelStore(ModelStore):
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _model_dir(self, model_name: str) -> Path:
        if not _NAME.fullmatch(model_name):  # the name becomes a path: no separators, no '..'
            raise StoreError(f"invalid model name {model_name!r}")
        return self.root / model_name

    def _dir(self, model_name: str, version: int) -> Path:
        return self._model_dir(model_name) / f"v{valid_version(version)}"

    def _open_lock(self, directory: Path) -> int:
        """A descriptor of the writers' lock file of the model folder ``directory`` (created if need
        be). The owner's only: flock takes a read-only descriptor, so any local user who could
        open it could hold the lock and keep every writer waiting; one an older store made 0644
        is tightened when it is ours."""
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) & 0o077:
                os.fchmod(fd, 0o600)
        except OSError as exc:  # a file system without modes: the lock still works
            log.warning("cannot make the writers' lock %s the owner's only: %s",
                        (directory / LOCK_FILE).relative_to(self.root), exc.strerror or type(exc).__name__)
        return fd

    @contextmanager
    def _locked(self, model_name: str):
        """Hold the model's writers' lock (``LOCK_FILE``, see the module doc)."""
        directory = self._model_dir(model_name)
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = self._open_lock(directory)
        except OSError as exc:  # a link (ELOOP: never followed), a folder, no permission
            raise StoreError(f"cannot take the writers' lock {directory / LOCK_FILE}: "
                             f"{exc.strerror or exc}; it must be a regular file the service may write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def uri(self, model_name: str, version: int) -> str:
        return self._dir(model_name, version).resolve().as_uri()

    def exists(self, model_name: str, version: int) -> bool:
        """Whether the version's folder holds a manifest and weights (whether they are
        intact is :meth:`verify`'s question: a damaged version exists, so it is not taken
        for a purged one)."""
        d = self._dir(model_name, version)
        return os.path.lexists(d / MANIFEST_FILE) and os.path.lexists(d / WEIGHTS_FILE)

    def versions(self, model_name: str, clean: bool = True) -> list[int]:
        """See :meth:`ModelStore.versions`. Only folders named ``v`` and a number in ASCII
        digits without a leading zero, at most ``MAX_VERSION``, with a manifest count
        (``v01``, a non-ASCII digit or ``v99999999999`` are not versions); whether the manifest
        is intact and names that version is :meth:`manifest`'s check."""
        d = self._model_dir(model_name)
        if not d.is_dir():
            return []
        if clean:
            self.remove_stale_tmp(model_name)
        found = []
        for child in d.iterdir():  # v<number> folders with a manifest (intact or not; read it to know)
            m = _VERSION_DIR.fullmatch(child.name)
            if m and len(m.group(1)) <= 10 and int(m.group(1)) <= MAX_VERSION \
                    and os.path.lexists(child / MANIFEST_FILE):
                found.append(int(m.group(1)))
        return sorted(found)

    def remove_stale_tmp(self, model_name: str, older_than_s: float = STALE_TMP_S) -> list[str]:
        """Remove the temporary files and folders of writes that died (older than
        ``older_than_s``); returns their names. Under the model's lock, taken without waiting:
        every writer holds it for the whole life of its temporary folder, so while it is free
        what looks stale is a dead writer's; while a writer holds it, nothing is removed (one
        stalled past ``older_than_s`` had its folder emptied under it, and its rename then left
        an empty version folder that no write could take again). One that cannot be removed (no
        permission, a busy file on NFS) is logged and left: a listing (:meth:`versions`, and
        through it every job's version number) must not fail on what a dead writer left behind."""
        return self._remove_tmp(model_name, time.time() - older_than_s, wait=False)

    def remove_leftovers(self, model_name: str) -> list[str]:
        """Remove every temporary file and folder in the model's folder, whatever its age (see
        :meth:`ModelStore.remove_leftovers`): the lock is waited for, and once held no writer is
        in flight, so each one is a dead writer's (a version's weights, a calibration's scores).
        :class:`StoreError` naming the first that cannot be removed."""
        return self._remove_tmp(model_name, math.inf, wait=True)

    def _remove_tmp(self, model_name: str, cutoff: float, wait: bool) -> list[str]:
        d = self._model_dir(model_name)
        stale = []
        for child in d.iterdir() if d.is_dir() else ():
            try:
                if child.name.startswith(TMP_PREFIX) and child.lstat().st_mtime < cutoff:
                    stale.append(child)
            except OSError:  # removed meanwhile, or cannot be looked at: not removed either
                continue
        if not stale:
            return []  # no lock taken, no lock file made, for a listing with nothing to clean
        if wait:
            with self._locked(model_name):
                return self._remove_each(d, cutoff, strict=True)
        try:
            fd = self._open_lock(d)
        except OSError as exc:
            log.warning("cannot take the writers' lock %s to remove what writes that died left (%s); left as it is",
                        (d / LOCK_FILE).relative_to(self.root), exc.strerror or type(exc).__name__)
            return []
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []  # a writer is at work (maybe the stalled owner of one of them): a later listing cleans up
            except OSError as exc:
                log.warning("cannot take the writers' lock %s to remove what writes that died left (%s); left as "
                            "it is", (d / LOCK_FILE).relative_to(self.root), exc.strerror or type(exc).__name__)
                return []
            return self._remove_each(d, cutoff, strict=False)
        finally:
            os.close(fd)  # releases the lock

    def _remove_each(self, d: Path, cutoff: float, strict: bool) -> list[str]:
        """Remove the temporary entries of ``d`` older than ``cutoff`` (the caller holds the
        lock, and lists them again under it: one may have gone meanwhile)."""
        removed = []
        for child in sorted(d.iterdir()):
            try:
                if not (child.name.startswith(TMP_PREFIX) and child.lstat().st_mtime < cutoff):
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            except FileNotFoundError:  # another process removed it first
                continue
            except OSError as exc:
                where = child.relative_to(self.root)
                if strict:
                    raise StoreError(f"cannot remove {where}, left in the model store by a write that died: "
                                     f"{exc.strerror or type(exc).__name__}; remove it by hand") from None
                log.warning("cannot remove %s, left in the model store by a write that died: %s; remove it by "
                            "hand", where, exc.strerror or type(exc).__name__)
                continue
            removed.append(child.name)
        return removed

    def manifest(self, model_name: str, version: int) -> Manifest:
        """The version's manifest; :class:`StoreError` when there is none,
        :class:`DamagedManifest` (naming the file) when it cannot be read or its ``model``
        and ``version`` are not its folder's."""
        path = self._dir(model_name, version) / MANIFEST_FILE
        try:
            raw = _read_regular(path)
        except FileNotFoundError:
            raise StoreError(f"no version {version} of model {model_name!r} in {self.root}") from None
        except _NotRegular as exc:
            raise DamagedManifest(f"{path} is {exc}, not a regular file") from None
        try:
            data = loads_strict(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DamagedManifest(f"{path} is not UTF-8 text: {exc}") from None
        except RecursionError:
            raise DamagedManifest(f"{path} is not a manifest: JSON nested too deep") from None
        except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
            raise DamagedManifest(f"{path} is not JSON: {exc}") from None
        manifest = Manifest.from_dict(data, str(path))
        if manifest.model != model_name or manifest.version != version:
            raise DamagedManifest(f"{path} records model {manifest.model!r} version {manifest.version}, but lies in "
                                  f"the folder of {model_name!r} version {version}")
        return manifest

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
        """Write a version atomically and return its manifest (idempotent, see
        :mod:`model_store.base`). Under the model's lock (module doc): an existing copy of
        the same job whose weights no longer match its manifest is replaced; a purged
        version (manifest kept, weights deleted) is never rewritten (:class:`PurgedVersion`);
        a version folder that holds no complete version is not overwritten (:class:`StoreError`
        naming it). An existing version whose manifest is damaged is not replaced
        (:class:`DamagedManifest`: whose it is cannot be told; see :meth:`discard_if_damaged`).

        The manifest is strict JSON (no NaN or infinities). ``metrics`` are converted by the
        rule of :func:`_json_value`: numbers stay numbers (ints as ints; numpy scalars and
        one-element tensors as their number), NaN and infinities become null, and a value
        that is not JSON (a datetime, an arbitrary object) is a :class:`StoreError` naming
        its key. Any other field that is not strict JSON is a :class:`StoreError` too."""
        version = valid_version(version)
        if parent is not None:
            parent = valid_version(parent, "parent version")
        deleted_cells = [list(c) for c in (deleted_cells or [])]
        erased_cells = [list(c) for c in (erased_cells or [])]
        for name, cells in (("deleted_cells", deleted_cells), ("erased_cells", erased_cells)):
            if not _is_cells(cells):  # what Manifest.from_dict would refuse on reading it back
                raise StoreError(f"{name} must be [instance, task] pairs of strings, got {cells[:3]!r}")
        # before the stored copy is looked at: metrics that cannot be stored used to be refused
        # after a damaged copy of this job had been discarded
        clean_metrics = _json_value(dict(metrics or {}), "metrics")
        final = self._dir(model_name, version)
        with self._locked(model_name):
            if self.exists(model_name, version):
                existing = self._same_or_conflict(model_name, version, job_id, model)
                if self.verify(model_name, version):
                    return existing
                # this job's artifact, stored by another attempt, with weights that no longer
                # match its manifest: it is replaced, never handed on to be published
                self._discard(final, version)
            else:
                self._refuse_occupied(model_name, version, final)
            tmp = final.parent / f"{TMP_PREFIX}v{version}-{uuid.uuid4().hex}"
            try:
                # the owner's only from the start, as calibration.json: the weights hold what they
                # learnt of people's data, the manifest names the instances erased (it stays after a
                # purge), and a writer killed before the chmods below left them readable to all
                os.mkdir(tmp, 0o700)
                weights = save_model(model, tmp)
                data = weights.read_bytes()
                manifest = Manifest(
                    model=model_name,
                    version=version,
                    parent=parent,
                    sha256=sha256_bytes(data),
                    created_at=datetime.now(timezone.utc).isoformat(),
                    model_config=asdict(model.config),
                    dataset=dict(dataset),
                    deletions=list(deletions or []),
                    deleted_cells=deleted_cells,
                    erased_cells=erased_cells,
                    metrics=clean_metrics,
                    job_id=job_id,
                    train_config=train_config,
                    note=note,
                )
                try:
                    # no sort_keys: the order of model_config["tasks"] is the model's head order
                    text = json.dumps(manifest.to_dict(), indent=2, allow_nan=False)
                except (TypeError, ValueError) as exc:
                    raise StoreError(f"the manifest of {model_name} v{version} is not strict JSON: {exc}") from None
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                with os.fdopen(os.open(tmp / MANIFEST_FILE, flags, 0o600), "w", encoding="utf-8") as fh:
                    fh.write(text)
                os.chmod(tmp, 0o700)  # whatever the umask took away
                for f in tmp.iterdir():
                    os.chmod(f, 0o600)
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                _fsync_dir(tmp)
                try:
                    os.rename(tmp, final)  # atomic; fails when another writer (without the lock) got there first
                except OSError as exc:
                    if self.exists(model_name, version):
                        return self._same_or_conflict(model_name, version, job_id, model)
                    self._refuse_occupied(model_name, version, final)
                    raise StoreError(f"cannot store {model_name} v{version} at {final}: {exc}") from exc
                _fsync_dir(final.parent)
                return manifest
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)

    def check_free(self, model_name: str, version: int) -> None:
        """See :meth:`ModelStore.check_free`."""
        if not self.exists(model_name, version):
            self._refuse_occupied(model_name, version, self._dir(model_name, version))

    def _refuse_occupied(self, model_name: str, version: int, final: Path) -> None:
        """For a version that is not stored (:meth:`exists` False): :class:`PurgedVersion`
        when it was purged, :class:`StoreError` naming the folder when something else is
        there; nothing when the place is free."""
        if os.path.lexists(final / MANIFEST_FILE) and not os.path.lexists(final / WEIGHTS_FILE):
            raise PurgedVersion(f"{model_name} v{version} was purged (its weights held erased data; its manifest is "
                                f"kept in {final}): a purged version is never written again")
        if os.path.lexists(final):
            raise StoreError(f"{final} exists but holds no complete version of {model_name!r} "
                             "(a manifest and weights): it is not overwritten; remove it to store the version")

    def calibration(self, model_name: str) -> dict | None:
        return _read_calibration(self._model_dir(model_name) / CALIBRATION_FILE)

    def put_calibration(self, model_name: str, payload: dict) -> dict:
        """See :meth:`ModelStore.put_calibration`. Under the model's lock (module doc), so the
        first calibration stored stands; it is renamed into place, never hard-linked: a writer
        killed between a link and the unlink of its temporary name left a second name of the
        scores that a later redaction (:meth:`replace_calibration`) did not reach."""
        directory = self._model_dir(model_name)
        final = directory / CALIBRATION_FILE
        with self._locked(model_name):
            stored = _read_calibration(final)  # a link or a damaged file is refused, never written through
            if stored is None:
                self._write_calibration(directory, payload)
                stored = _read_calibration(final)
        return stored

    def replace_calibration(self, model_name: str, payload: dict) -> None:
        """See :meth:`ModelStore.replace_calibration`. It also removes the temporary files of
        calibration writes that died (every writer holds the lock, so none is in flight):
        they may hold the scores this replacement takes out."""
        directory = self._model_dir(model_name)
        final = directory / CALIBRATION_FILE
        with self._locked(model_name):
            # a link is refused: replacing it would leave the scores in the file it points to
            if _read_calibration(final) is None:
                raise StoreError(f"no calibration of {model_name!r} in {self.root} to replace")
            self._write_calibration(directory, payload)
            for leftover in directory.glob(f"{TMP_PREFIX}calibration-*"):
                if not leftover.is_dir() or leftover.is_symlink():
                    leftover.unlink(missing_ok=True)  # a link is removed, never followed

    @staticmethod
    def _write_calibration(directory: Path, payload: dict) -> None:
        """Write ``calibration.json`` atomically (readers see the old one or the new one);
        the caller holds the model's lock."""
        tmp = directory / f"{TMP_PREFIX}calibration-{uuid.uuid4().hex}"
        try:
            # 0600, as the weights: the scores are numbers about people's data (a purge redacts them)
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "w") as fh:
                json.dump(_strict_calibration(payload), fh, allow_nan=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, directory / CALIBRATION_FILE)
            _fsync_dir(directory)
        finally:
            tmp.unlink(missing_ok=True)

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

    def _read_verified(self, model_name: str, version: int) -> tuple[bytes, Manifest, ModelConfig]:
        """The weights, manifest and architecture of an intact version: :class:`DamagedManifest`
        (a ``model_config`` that is not a valid architecture included), :class:`IntegrityError`
        for weights that are not a regular file or do not match the sha256,
        :class:`PurgedVersion` for weights that are gone."""
        manifest = self.manifest(model_name, version)
        folder = self._dir(model_name, version)
        try:
            config = model_config_from({"model": manifest.model_config}, folder / MANIFEST_FILE)
        except ValueError as exc:
            raise DamagedManifest(f"{exc} (the manifest's model_config)") from None
        path = folder / WEIGHTS_FILE
        try:
            data = _read_regular(path)  # read once: the bytes checked are the bytes loaded
        except FileNotFoundError:
            raise PurgedVersion(f"{model_name} v{version}: its weights were purged (they held erased data); "
                                "only its manifest is kept") from None
        except _NotRegular as exc:
            raise IntegrityError(f"{path} is {exc}, not a regular file: not the weights of {model_name} "
                                 f"v{version}") from None
        digest = sha256_bytes(data)
        if digest != manifest.sha256:
            raise IntegrityError(
                f"{model_name} v{version}: weights sha256 {digest} does not match the manifest's {manifest.sha256}"
            )
        return data, manifest, config

    def check_weights(self, model_name: str, version: int) -> None:
        data, _, config = self._read_verified(model_name, version)
        try:  # and they are weights of the manifest's architecture, which load will build
            fitting_state(config, data, self._dir(model_name, version) / WEIGHTS_FILE)
        except ValueError as exc:
            raise WrongArchitecture(str(exc)) from None

    def discard(self, model_name: str, version: int, strict: bool = False) -> None:
        """See :meth:`ModelStore.discard`. A version folder that is a link is refused
        (:class:`IntegrityError` naming it), as :meth:`purge` refuses weights that are one: the
        link would go and its target, which may hold erased data, would stay, recorded as gone."""
        final = self._dir(model_name, version)
        if not os.path.lexists(final):
            return
        if final.is_symlink():
            raise IntegrityError(f"cannot discard {model_name} v{version}: {final} is a symbolic link to "
                                 f"{os.readlink(final)}, not a folder the store wrote; the link is not followed, "
                                 "its target is left as it is: check and remove it by hand")
        with self._locked(model_name):
            self._discard(final, version, strict=strict)

    def _discard(self, final: Path, version: int, strict: bool = False) -> None:
        """Remove the version folder ``final`` (the caller holds the model's lock). What cannot
        be deleted stays under a temporary name (a later listing removes it once stale); with
        ``strict`` (a purge: it must not record as deleted what is still on disk) it is a
        :class:`StoreError` naming it."""
        if not os.path.lexists(final):
            return
        doomed = final.parent / f"{TMP_PREFIX}discarded-v{version}-{uuid.uuid4().hex}"
        os.rename(final, doomed)  # atomic: readers see the version or nothing
        _fsync_dir(final.parent)
        try:
            if doomed.is_dir() and not doomed.is_symlink():
                shutil.rmtree(doomed)
            else:
                doomed.unlink(missing_ok=True)  # a link is removed, never followed
        except OSError as exc:
            if strict:
                raise StoreError(f"cannot delete {doomed.relative_to(self.root)} (version {version} of "
                                 f"{final.parent.name}): {exc.strerror or type(exc).__name__}; remove it by hand") from None
            log.warning("cannot delete %s: %s; a later listing removes it", doomed.relative_to(self.root),
                        exc.strerror or type(exc).__name__)

    def discard_if_damaged(self, model_name: str, version: int) -> bool:
        final = self._dir(model_name, version)
        if not os.path.lexists(final):
            return False
        with self._locked(model_name):
            if not self.exists(model_name, version):
                return False  # gone meanwhile, purged (manifest kept), or incomplete: not a version
            try:
                if self.verify(model_name, version):
                    return False
            except PurgedVersion:  # purged meanwhile (by a writer that takes no lock)
                return False
            self._discard(final, version)
            return True

    def purge(self, model_name: str, version: int) -> bool:
        """Delete the version's weights (see :meth:`ModelStore.purge`). Weights that are not a
        regular file are refused (:class:`IntegrityError` naming them): a link is not followed,
        since its target, which would keep the erased data, lies outside the version."""
        self.manifest(model_name, version)  # StoreError for a version that is not stored
        weights = self._dir(model_name, version) / WEIGHTS_FILE
        with self._locked(model_name):
            try:
                st = os.lstat(weights)
            except FileNotFoundError:
                return False
            mode = st.st_mode
            if stat.S_ISREG(mode) and st.st_nlink > 1:
                # unlinking one name leaves the bytes under the other (a backup made with cp -al):
                # recorded as purged while the erased data stayed on disk
                raise IntegrityError(f"cannot purge {model_name} v{version}: its weights file has {st.st_nlink} "
                                     "names (hard links; the store never makes one): deleting this one would "
                                     "leave the data under the others; find them (find -samefile) and remove "
                                     "them, then purge again")
            if not stat.S_ISREG(mode):
                link = "; the link is not followed, its target is left as it is" if stat.S_ISLNK(mode) else ""
                raise IntegrityError(f"cannot purge {model_name} v{version}: {weights} is {_what(weights, mode)}, not a "
                                 f"regular file (the store never writes one){link}: check and remove it by hand")
            try:
                weights.unlink()  # atomic: readers see the weights or none
            except FileNotFoundError:
                return False
            _fsync_dir(weights.parent)
            return True

    def load(self, model_name: str, version: int, device: str | torch.device = "cpu") -> tuple[MultiTaskNet, Manifest]:
        data, manifest, config = self._read_verified(model_name, version)
        path = self._dir(model_name, version) / WEIGHTS_FILE
        try:
            model = model_from_safetensors(config, data, path, device)
        except ValueError as exc:  # not safetensors, or weights that do not fit the manifest's architecture
            raise WrongArchitecture(str(exc)) from None
        return model.eval(), manifest


def _state_sha(model: MultiTaskNet) -> str:
    """The sha256 of the weights file :func:`save_model` would write for ``model`` (for the
    no-job idempotency check), serialised in memory: a copy written to the system's temporary
    folder stayed there, outside the store and every purge, when the process was killed."""
    from safetensors.torch import save

    return sha256_bytes(save(saved_state(model)))
