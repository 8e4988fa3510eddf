"""Alembic migrations of the compliance record (see ``worker.migrate``)."""
