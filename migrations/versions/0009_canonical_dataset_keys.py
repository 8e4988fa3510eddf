"""tombstones.dataset_key: the hash of the dataset spec with every default written out
(``unlearning.data.canonical_spec``), no longer of the spec as written. Two models whose
specs describe the same data written differently (``{"name": "indoor"}`` and the same
with its sizes written out, a default noise option given, an npy root as ``/data/nyu/``
or ``/data/./nyu``) had tombstones under two keys: an erasure through one was not erased
data for the other, nor propagated to it. Their tombstones now share the one key.

Upgrade, per model row: its old key (the old hash of ``models.dataset``) is re-keyed to
the new one. Where two old keys become one and both hold the same cell (instance, task),
the earliest tombstone (lowest id) stays and the later ones are deleted; nothing refers
to a tombstone's row, but ``model_versions.tombstone_watermark`` compares tombstone ids
(every tombstone of the key up to it is in the version's lineage), which no longer holds
for a key that took another key's tombstones: the watermarks of the versions of every
model on such a key are cleared (NULL: compared cell by cell, as before 0005). A model
then behind on the other model's erasures is announced by the sweeper and follows with
a propagate job.

Downgrade: each tombstone goes back to the old key of the model whose request (or job)
wrote it, one of the models on its key (one written after the upgrade too: the other
models on the data then no longer see it, as before 0009); one whose request names no
such model goes to the key of the model on it whose spec was already canonical, else of
the first by name. What it cannot restore: the later duplicates deleted on upgrade (the
earliest's model keeps the cell, the other model's key no longer has it), and the cleared
watermarks (they stay NULL, which is always correct, only slower). It fails on the
unique key if something wrote tombstones under an old key after the upgrade (a worker
still running the old code).

Offline (``alembic upgrade --sql``, ``downgrade --sql``) neither step can run: the keys
are sha256 hashes of JSON specs, computed in Python from the rows. The script carries a
comment saying so and how to run the step online (:data:`OFFLINE`); this revision changes
no schema, only rows, and both steps may run again.

The key functions below are frozen as they were at this revision: a migration must mean
the same when ``unlearning.data`` changes later (a later canonical form needs a migration
of its own).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import context, op

revision: str = "0009"
down_revision: Union[str, Sequence[str], None] = "0008"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

#: unlearning.data.synthetic's size defaults and unlearning.data.renderer.NoiseOptions', at 0009
SYNTHETIC_SIZES = {"n_train": 160, "n_test": 48, "height": 48, "width": 64, "seed": 0}
NOISE_DEFAULTS = {"depth_sigma": 0.02, "depth_dropout": 0.01, "normal_sigma": 0.02,
                  "label_flip": 0.2, "label_ignore": 0.1, "image_sigma": 0.02}
#: unlearning.data.npy_format.NUM_CLASSES, at 0009
NPY_NUM_CLASSES = {"nyuv2": 13, "cityscapes": 7}

models = sa.table("models", sa.column("name", sa.String), sa.column("dataset", sa.JSON))
tombstones = sa.table("tombstones", sa.column("id", sa.Integer), sa.column("dataset_key", sa.String),
                      sa.column("instance_id", sa.String), sa.column("task", sa.String),
                      sa.column("request_id", sa.String))
versions = sa.table("model_versions", sa.column("model_name", sa.String),
                    sa.column("tombstone_watermark", sa.Integer))
requests = sa.table("deletion_requests", sa.column("id", sa.String), sa.column("model_name", sa.String))
jobs = sa.table("jobs", sa.column("id", sa.String), sa.column("model_name", sa.String))


def _hash(spec: dict) -> str:
    body = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return f"{spec.get('name')}-{hashlib.sha256(body.encode()).hexdigest()[:12]}"


def old_key(spec: dict) -> str:
    """``unlearning.data.dataset_key`` before 0009: the spec as written."""
    return _hash(spec)


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _noise(noise):
    """The noise fields that differ from their defaults, or None when the value is no noise
    spec (kept as given then, as the loader would refuse it)."""
    if noise is None:
        given = dict(NOISE_DEFAULTS)
    elif noise == "clean":
        given = {k: 0.0 for k in NOISE_DEFAULTS}
    elif isinstance(noise, dict) and set(noise) <= set(NOISE_DEFAULTS):
        given = dict(NOISE_DEFAULTS)
        for k, v in noise.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not _finite(v) or not 0 <= v <= 1:
                return None
            given[k] = float(v)
    else:
        return None
    return {k: v for k, v in given.items() if v != NOISE_DEFAULTS[k]}


def canonical(spec: dict) -> dict:
    """``unlearning.data.canonical_spec`` at 0009, for the JSON a models row holds."""
    out, name = dict(spec), spec.get("name")
    if name in ("indoor", "street"):
        for key, default in SYNTHETIC_SIZES.items():
            out.setdefault(key, default)
        noise = _noise(spec.get("noise"))
        if noise is not None:
            out.pop("noise", None)
            if noise:
                out["noise"] = noise
    elif name in NPY_NUM_CLASSES:
        if isinstance(out.get("root"), str) and out["root"]:
            out["root"] = os.path.normpath(out["root"])
        for key, default in (("num_classes", NPY_NUM_CLASSES[name]), ("limit", None)):
            if out.get(key) is None:
                out[key] = default
    return out


def new_key(spec: dict) -> str:
    """``unlearning.data.dataset_key`` at 0009: the hash of :func:`canonical`."""
    return _hash(canonical(spec))


def _keys(connection) -> list[tuple[str, str, str]]:
    """``(model, old key, new key)`` of every model row whose dataset is a spec."""
    rows = connection.execute(sa.select(models.c.name, models.c.dataset).order_by(models.c.name)).all()
    return [(name, old_key(spec), new_key(spec)) for name, spec in rows if isinstance(spec, dict)]


def _by_new_key(keys) -> dict[str, list[tuple[str, str]]]:
    groups: dict[str, list[tuple[str, str]]] = {}
    for name, old, new in keys:
        groups.setdefault(new, []).append((name, old))
    return groups


#: what `alembic upgrade --sql` and `downgrade --sql` write instead of the data step
OFFLINE = {
    "upgrade": "-- 0009 upgrade. Tombstones are NOT re-keyed by this script: their keys are hashes of "
               "models.dataset computed in Python. Re-key them online after applying it, with "
               "`alembic stamp 0008` and `alembic upgrade 0009` (0009 changes no schema; stamp the script's "
               "last revision again if it went further)",
    "downgrade": "-- 0009 downgrade. Tombstones are NOT re-keyed back by this script: their keys are hashes of "
                 "models.dataset computed in Python. Run `alembic downgrade 0008` online before applying it "
                 "(0009 changes no schema)",
}


def _offline(step: str) -> bool:
    if not context.is_offline_mode():
        return False
    op.execute(OFFLINE[step])
    return True


def upgrade() -> None:
    if _offline("upgrade"):
        return
    connection = op.get_bind()
    for new, members in _by_new_key(_keys(connection)).items():
        sources = sorted({old for _, old in members} | {new})
        if sources == [new]:
            continue  # every spec of this data was written canonically already
        holding = set(connection.execute(sa.select(tombstones.c.dataset_key).distinct().where(
            tombstones.c.dataset_key.in_(sources))).scalars())
        if not holding or holding == {new}:
            continue
        if len(holding) > 1:
            # a cell erased under two keys: the earliest tombstone stays
            earlier = tombstones.alias("earlier")
            connection.execute(sa.delete(tombstones).where(
                tombstones.c.dataset_key.in_(sources),
                sa.exists().where(earlier.c.dataset_key.in_(sources), earlier.c.instance_id == tombstones.c.instance_id,
                                  earlier.c.task == tombstones.c.task, earlier.c.id < tombstones.c.id)))
            # a watermark covered its own key's tombstones only
            connection.execute(sa.update(versions).where(versions.c.model_name.in_([n for n, _ in members]))
                               .values(tombstone_watermark=None))
        connection.execute(sa.update(tombstones).where(tombstones.c.dataset_key.in_(sorted(holding - {new})))
                           .values(dataset_key=new))


def downgrade() -> None:
    if _offline("downgrade"):
        return
    connection = op.get_bind()
    for new, members in _by_new_key(_keys(connection)).items():
        moved = [(name, old) for name, old in members if old != new]
        if not moved:
            continue
        for name, old in moved:  # the tombstones written by this model's requests and jobs
            connection.execute(sa.update(tombstones).where(
                tombstones.c.dataset_key == new,
                sa.or_(tombstones.c.request_id.in_(sa.select(requests.c.id).where(requests.c.model_name == name)),
                       tombstones.c.request_id.in_(sa.select(jobs.c.id).where(jobs.c.model_name == name))))
                .values(dataset_key=old))
        if len(moved) == len(members):  # no model's spec was canonical: the rest go to the first's key
            connection.execute(sa.update(tombstones).where(tombstones.c.dataset_key == new)
                               .values(dataset_key=moved[0][1]))
