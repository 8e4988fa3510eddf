"""The datasets models were trained on, as the service sees them: cached splits
and the cells erased so far (tombstones)."""
from __future__ import annotations

import json
import logging
import threading
from functools import lru_cache

from sqlalchemy import select
from sqlalchemy.orm import Session

from unlearning.data import SYNTHETIC_DATASETS, MultiTaskDataset, canonical_json, dataset_key, load_reference, load_splits

from .settings import Settings
from .tables import Tombstone

log = logging.getLogger(__name__)
_lock = threading.Lock()


def dataset_spec(settings: Settings) -> dict:
    """The dataset spec the settings describe (the one a first model is trained on).

    Settings have no data root yet, so only the synthetic datasets are fully described.
    """
    if settings.dataset in SYNTHETIC_DATASETS:
        return {
            "name": settings.dataset,
            "n_train": settings.n_train,
            "n_test": settings.n_test,
            "height": settings.image_height,
            "width": settings.image_width,
            "seed": settings.seed,
        }
    return {"name": settings.dataset}


@lru_cache(maxsize=8)
def _load(spec_json: str) -> tuple[MultiTaskDataset, MultiTaskDataset]:
    return load_splits(json.loads(spec_json))


def get_splits(spec: dict) -> tuple[MultiTaskDataset, MultiTaskDataset]:
    """``(train, test)`` for ``spec``, loaded once per process (per :func:`canonical_json`:
    two specs of the same data written differently share one load, as they share one
    :func:`dataset_key`). The datasets are the original ones (no erasure applied): callers
    apply tombstones with ``without`` and must not modify the returned objects."""
    key = canonical_json(spec)
    with _lock:  # one load per spec even when two requests race for it
        return _load(key)


@lru_cache(maxsize=8)
def _load_reference(spec_json: str, n: int) -> MultiTaskDataset:
    return load_reference(json.loads(spec_json), n)


def reference_scenes(settings: Settings, spec: dict) -> int:
    """How many held-out scenes of its own a job on ``spec``'s data gives the method
    (``UNLEARND_REFERENCE_SCENES``): 0, the test split, for a dataset that is not synthetic
    (it has no further scenes to render)."""
    if not settings.reference_scenes:
        return 0
    if spec.get("name") not in SYNTHETIC_DATASETS:
        log.warning("UNLEARND_REFERENCE_SCENES=%d: the %r dataset is not synthetic, so it has no scenes to render; "
                    "jobs on it take the test split as the method's reference", settings.reference_scenes,
                    spec.get("name"))
        return 0
    return int(settings.reference_scenes)


def get_reference(settings: Settings, spec: dict) -> MultiTaskDataset | None:
    """The method's held-out reference for a job on ``spec``'s data: ``None`` for the test
    split (:func:`reference_scenes` is 0), else that many rendered scenes beyond the test
    split (:func:`unlearning.data.load_reference`), loaded once per process."""
    n = reference_scenes(settings, spec)
    if not n:
        return None
    key = canonical_json(spec)
    with _lock:
        return _load_reference(key, n)


def erased_cells(session: Session, spec: dict, instance_id: str | None = None) -> dict[tuple[str, str], str]:
    """Every tombstoned cell of ``spec``'s dataset (of one instance, with ``instance_id``:
    an index lookup, where the whole dataset's grows with every erasure) -> the request
    that erased it."""
    query = select(Tombstone.instance_id, Tombstone.task, Tombstone.request_id).where(
        Tombstone.dataset_key == dataset_key(spec))
    if instance_id is not None:
        query = query.where(Tombstone.instance_id == instance_id)
    return {(iid, task): rid for iid, task, rid in session.execute(query)}
