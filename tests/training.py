"""How the tests train with the agent attached, where the loop itself is not what they test."""

from __future__ import annotations

import moxco.agent


def full_batch(model, opt, criterion, x, y, steps: int, **options):
    """``moxco.agent.attach(model, opt, criterion=criterion, **options)``, ``steps`` full-batch steps
    on ``(x, y)``, close; returns the closed agent, which must have reported no error."""
    agent = moxco.agent.attach(model, opt, criterion=criterion, **options)
    for _ in range(steps):
        criterion(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    agent.close()
    assert agent.errors == {}
    return agent
