"""The rule functions called directly, under concurrency (real PostgreSQL, real transactions)."""
from __future__ import annotations

import threading

import pytest

from worker.db import transaction
from worker.errors import ServiceError
from worker.requests import submit_deletion

from .conftest import counts


def _race(settings, calls):
    """Run each call in its own thread and transaction, released together; returns (status, request id)."""
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def run(i, kwargs):
        barrier.wait()
        try:
            with transaction(settings.database_url) as session:
                sub = submit_deletion(session, settings, **kwargs)
            results[i] = (202, sub.request.id)
        except ServiceError as exc:
            results[i] = (exc.status, None)

    threads = [threading.Thread(target=run, args=(i, kw)) for i, kw in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


@pytest.mark.parametrize("n", [4])
def test_racing_requests_for_one_cell_accept_exactly_one(settings, model, n):
    results = _race(settings, [{"instance_id": model.train_ids[0], "tasks": ["depth"]}] * n)
    assert sorted(status for status, _ in results) == [202] + [409] * (n - 1)
    c = counts(settings)
    assert (c["deletion_requests"], c["outbox"], c["audit_events"]) == (1, 1, 1)


def test_racing_twins_with_one_key_share_one_request(settings, model):
    call = {"instance_id": model.train_ids[1], "tasks": ["depth"], "idempotency_key": "same"}
    results = _race(settings, [call] * 3)
    assert [status for status, _ in results] == [202] * 3
    assert len({rid for _, rid in results}) == 1
    assert counts(settings)["deletion_requests"] == 1
