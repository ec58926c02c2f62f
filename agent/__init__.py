"""moxco.agent: hooks a PyTorch training loop, computes the audit metrics, ships them.

Lives in the top-level ``agent/`` folder and installs as ``moxco.agent`` (DESIGN §1). It depends
on ``moxco`` (the math) and on the storage layer in ``moxco.collector`` for the embedded SQLite
default, never on FastAPI or uvicorn. ``attach(model, optimizer)`` arrives with the agent issue.
"""
