"""Engine and session factory for the compliance record (PostgreSQL, or SQLite when embedded)."""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker


#: execution option of an engine whose transactions only read (:func:`read_only`)
READ_ONLY = "unlearnd_read_only"


def advisory_lock(session, name: str) -> None:
    """Serialise the transactions that take the lock ``name`` until each commits
    (PostgreSQL's transaction-scoped advisory lock; on SQLite writing transactions
    already run one at a time)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": name})


def read_only(engine: Engine) -> Engine:
    """``engine`` for transactions that only read (the API's GET routes, the metrics
    scrape): the same pool; on SQLite they begin DEFERRED instead of taking the write lock.

    Each such transaction reads one snapshot: a route reads in several statements (a
    certificate, a model's versions and its serving alias), and under PostgreSQL's READ
    COMMITTED a publish committing between two of them gave an answer that no state of
    the record ever had. REPEATABLE READ fixes the snapshot at the first statement (a
    reader never waits or fails for it); SQLite's deferred transactions under WAL already
    read one snapshot."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(**{READ_ONLY: True}, isolation_level="REPEATABLE READ")
    return engine.execution_options(**{READ_ONLY: True})


def _wal(cursor, wait_s: float = 30.0) -> None:
    """Switch the SQLite file to WAL. On a new file another process switching it at the same
    moment makes this fail at once with "database is locked" (the connection's busy timeout
    does not cover it): try again for up to ``wait_s`` seconds."""
    import sqlite3
    import time

    deadline = time.monotonic() + wait_s
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection, _):
            # sqlite3's legacy transaction control BEGINs only before INSERT/UPDATE/DELETE,
            # so a SAVEPOINT issued first runs outside any transaction and its RELEASE
            # commits on its own. SQLAlchemy emits BEGIN instead (its documented recipe).
            dbapi_connection.isolation_level = None
            cur = dbapi_connection.cursor()
            _wal(cur)
            cur.execute("PRAGMA foreign_keys=ON")
            # REPLACE deletes the row it replaces, and SQLite fires DELETE triggers for that only
            # with recursive triggers on: without it, INSERT OR REPLACE rewrote an audit event
            # or moved the chain head back past the append-only triggers (migration 0007)
            cur.execute("PRAGMA recursive_triggers=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            # IMMEDIATE takes the write lock up front: transactions that read then write
            # (the pending-cell check, the audit chain's next seq) run one after another,
            # waiting up to ``timeout`` seconds, instead of failing or racing at write time.
            # PostgreSQL gets the same ordering from its row and advisory locks. A reader
            # (:func:`read_only`) begins DEFERRED: under WAL it reads a snapshot and never
            # waits for the write lock (a job publishing, a request being accepted).
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

        return engine
    # libpq: give up connecting after 10 s, and notice a peer that vanished mid-query
    # (keepalives) instead of waiting on a dead connection for as long as TCP does.
    # READ COMMITTED whatever the server's default_transaction_isolation: the writers order
    # themselves with row and advisory locks and then read what committed before them (the
    # audit chain's head, a request's pending cells); under REPEATABLE READ, a hardening
    # setting some servers carry, most concurrent writers failed with serialisation errors.
    # Readers that need one snapshot ask for REPEATABLE READ themselves (:func:`read_only`).
    return create_engine(url, pool_pre_ping=True, isolation_level="READ COMMITTED",
                         connect_args=dict(PG_CONNECT_ARGS))


#: libpq connection parameters of every PostgreSQL engine (psycopg and psycopg2 take them)
PG_CONNECT_ARGS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                   "keepalives_count": 3}


@lru_cache
def engine_for(url: str) -> Engine:
    return make_engine(url)


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)


@contextmanager
def transaction(url: str) -> Iterator[Session]:
    """One explicit transaction: commit on success, roll back on error."""
    session = session_factory(url)()
    try:
        with session.begin():
            yield session
    finally:
        session.close()


@contextmanager
def read_only_transaction(url: str) -> Iterator[Session]:
    """One transaction that only reads (:func:`read_only`: on SQLite it does not take the
    write lock); its rows stay readable after it ends."""
    session = sessionmaker(read_only(engine_for(url)), expire_on_commit=False)()
    try:
        with session.begin():
            yield session
    finally:
        session.close()
