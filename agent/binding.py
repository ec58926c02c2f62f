"""Which parameters the agent measures: the optimizer's, named through the model, and when they exist.

The agent measures the parameters the optimizer updates, in the optimizer's order, named as the
model names them (the replays substitute them by name). Parameters of lazy modules (``LazyLinear``)
do not exist before the model's first forward: the agent binds to them at the end of that forward,
before the first backward, and measures from the first step. A parameter group added later
(``optimizer.add_param_group``) is picked up at the next forward (or step): its parameters' current
values are their ``x_{t−1}`` (the optimizer did not move them) and their ``x_0``.

One optimizer has at most one live agent (``claim``): a second ``attach`` on it is refused, since two
agents would each take the step's measurements and the second would replay with the first's hooks in
place.
"""

from __future__ import annotations

import weakref
from typing import Any, List, Tuple

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from moxco.agent.distributed import unwrap

_LIVE: "weakref.WeakKeyDictionary[Any, weakref.ref]" = weakref.WeakKeyDictionary()


def optimizer_params(model: nn.Module, optimizer: torch.optim.Optimizer) -> Tuple[List[torch.Tensor], List[str]]:
    """The optimizer's parameters in its order and their names in ``model``; ``ValueError`` when the
    optimizer holds a parameter that is not the model's (a programming error of the caller)."""
    names = {id(p): n for n, p in unwrap(model).named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    unknown = [i for i, p in enumerate(params) if id(p) not in names]
    if unknown:
        raise ValueError("the optimizer holds parameters that are not the model's (first at position "
                         f"{unknown[0]}); attach the model whose parameters the optimizer updates")
    return params, [names[id(p)] for p in params]


def param_count(optimizer: torch.optim.Optimizer) -> int:
    """How many parameters the optimizer holds (one ``len`` per group: cheap enough for every step)."""
    return sum(len(group["params"]) for group in optimizer.param_groups)


def any_lazy(params: List[torch.Tensor]) -> bool:
    """Whether some parameter is not materialised yet (a lazy module before its first forward)."""
    return any(is_lazy(p) for p in params)


def claim(optimizer: Any, agent: Any) -> None:
    """Record ``agent`` as ``optimizer``'s live agent; ``RuntimeError`` when it has one already."""
    ref = _LIVE.get(optimizer)
    other = ref() if ref is not None else None
    if other is not None and not getattr(other, "_closed", True):
        raise RuntimeError(f"this optimizer already has a moxco agent attached (run {other.run!r}); use that agent, "
                           "or close it (agent.close()) before attaching another")
    _LIVE[optimizer] = weakref.ref(agent)


def release(optimizer: Any, agent: Any) -> None:
    """``optimizer`` has no live agent any more (``agent`` closed)."""
    ref = _LIVE.get(optimizer)
    if ref is not None and ref() in (agent, None):
        del _LIVE[optimizer]
