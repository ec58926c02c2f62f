"""moxco.agent: hooks a PyTorch training loop, computes the audit metrics, ships them.

``moxco.agent.attach(model, optimizer)`` is the whole user interface (``agent.core`` says what it
hooks and computes when). Lives in the top-level ``agent/`` folder and installs as
``moxco.agent`` (DESIGN §1). It writes through the storage layer of ``moxco.collector`` (SQLite
by default) and never imports FastAPI or uvicorn.
"""

from moxco.agent.capture import CaptureError
from moxco.agent.core import Agent, attach, default_run_name
from moxco.agent.writer import GoodnessSettings

__all__ = ["Agent", "CaptureError", "GoodnessSettings", "attach", "default_run_name"]
