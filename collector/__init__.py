"""moxco.collector: the storage layer (SQLAlchemy, SQLite or PostgreSQL) and, with the
``collector`` extra, the FastAPI service.

Lives in the top-level ``collector/`` folder and installs as ``moxco.collector``. Importing it
loads only the storage layer (``moxco.collector.store``): the agent writes through it in embedded
mode and never pulls in the web stack.
"""

from moxco.collector.store import RunInfo, Store, StoreError, open_store
from moxco.wire import Point

__all__ = ["Point", "RunInfo", "Store", "StoreError", "open_store"]
