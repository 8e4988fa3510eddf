"""Request-scoped dependencies: the settings and a database session.

Routes open their transaction explicitly (``with session.begin():``)."""
from __future__ import annotations

from typing import Annotated, Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from worker.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        session.close()


def get_read_session(request: Request) -> Iterator[Session]:
    """A session for routes that only read (``worker.db.read_only``: on SQLite it does not
    wait for the write lock a job or a submission holds)."""
    session = request.app.state.readers()
    try:
        yield session
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
ReadSessionDep = Annotated[Session, Depends(get_read_session)]
