"""moxco.collector: the storage layer (SQLAlchemy, SQLite or PostgreSQL) and, with the
``collector`` extra, the FastAPI service.

Lives in the top-level ``collector/`` folder and installs as ``moxco.collector`` (DESIGN §1).
Importing it loads only the storage layer: the agent writes through it in embedded mode and never
pulls in the web stack.
"""

from moxco.collector.storage import Point, RunInfo, Store, StoreError, open_store

__all__ = ["Point", "RunInfo", "Store", "StoreError", "open_store"]
