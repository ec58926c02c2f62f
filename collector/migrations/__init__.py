"""Alembic migrations of the moxco store (run by ``Store`` on open, and by ``moxco db upgrade``)."""
