"""moxco.agent: hooks a PyTorch training loop, computes the audit metrics, ships them.

``moxco.agent.attach(model, optimizer)`` is the whole user interface (``agent.core`` says what it
hooks and computes when). Lives in the top-level ``agent/`` folder and installs as
``moxco.agent``. It writes through the storage layer of ``moxco.collector`` (SQLite
by default) and never imports FastAPI or uvicorn.
"""

import importlib
from typing import Any

# Resolved on first use (PEP 562), so that ``moxco --help`` and the collector's processes, which
# import ``moxco.agent.demo_cli`` to register the command, do not import torch.
_EXPORTS = {"CaptureError": "capture", "Agent": "core", "attach": "core", "AgentOptions": "options",
            "default_run_name": "options", "GoodnessSettings": "options"}

__all__ = ["Agent", "AgentOptions", "CaptureError", "GoodnessSettings", "attach", "default_run_name"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'moxco.agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"moxco.agent.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
