"""Plumbing shared by the optimizers of :mod:`moxco.optim`: validation, the foreach switch, and the
black-box *base optimizer* that :class:`~moxco.optim.MoXCo` and :class:`~moxco.optim.SAM` wrap.

Nothing here is an optimization formula; the formulas live in each optimizer's module as pure
functions over lists of tensors.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

from torch import Tensor
from torch.optim import Optimizer

BaseSpec = Union[Optimizer, Callable[..., Optimizer]]


# --------------------------------------------------------------------------------------------
# validation (messages name the bad value, torch.optim style)
# --------------------------------------------------------------------------------------------


def check_lr(lr: Any, name: str = "lr") -> float:
    if isinstance(lr, Tensor):
        raise TypeError(f"{name} must be a Python float here (tensor learning rates are not supported), got a Tensor")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid {name}: {lr!r} (must be a finite number ≥ 0)")
    return float(lr)


def check_unit_interval(value: Any, name: str, *, closed_right: bool = False) -> float:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0.0
    ok = ok and (value <= 1.0 if closed_right else value < 1.0)
    if not ok:
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"Invalid {name}: {value!r} (must be in {interval})")
    return float(value)


def check_nonneg(value: Any, name: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number ≥ 0)")
    return float(value)


def check_betas(betas: Any) -> tuple:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    check_unit_interval(betas[0], "beta parameter at index 0")
    check_unit_interval(betas[1], "beta parameter at index 1")
    return (float(betas[0]), float(betas[1]))


def use_foreach(params: Sequence[Tensor], foreach: Optional[bool]) -> bool:
    """torch.optim's default: the multi-tensor (``torch._foreach_*``) path on CUDA, the per-tensor
    loop elsewhere; ``foreach=True/False`` forces either (both give the same numbers)."""
    if foreach is not None:
        return bool(foreach)
    return len(params) > 0 and all(p.is_cuda for p in params)


def params_with_grad(group: Dict[str, Any]) -> List[Tensor]:
    out = []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("moxco.optim optimizers do not support sparse gradients")
        out.append(p)
    return out


def float_or_nan(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------------------------
# a black-box base optimizer over the wrapper's own parameter groups
# --------------------------------------------------------------------------------------------


def build_base(
    wrapper_groups: List[Dict[str, Any]],
    base: BaseSpec,
    base_kwargs: Dict[str, Any],
    own_keys: Iterable[str],
) -> Optimizer:
    """Return the base optimizer the wrapper drives.

    ``base`` is either an optimizer *class* (or any callable ``base(param_groups, **kwargs)``),
    which is built here over the same parameter groups as the wrapper (group keys the wrapper does
    not own, e.g. ``weight_decay``, are passed on, and each group's ``lr`` too), or an already built
    ``Optimizer`` whose parameters must be exactly the wrapper's.
    """
    own = set(own_keys)
    if isinstance(base, Optimizer):
        if base_kwargs:
            raise ValueError(f"base is an optimizer instance; extra keyword arguments {sorted(base_kwargs)} have nowhere to go")
        mine = [id(p) for g in wrapper_groups for p in g["params"]]
        theirs = [id(p) for g in base.param_groups for p in g["params"]]
        if sorted(mine) != sorted(theirs):
            raise ValueError("base optimizer instance must be built over exactly the same parameters as the wrapper")
        if len(base.param_groups) != len(wrapper_groups) or any(
            [id(p) for p in a["params"]] != [id(p) for p in b["params"]] for a, b in zip(wrapper_groups, base.param_groups)
        ):
            raise ValueError("base optimizer instance must have the same parameter groups, in the same order, as the wrapper")
        return base
    if not callable(base):
        raise TypeError(f"base must be a torch.optim.Optimizer class, a factory or an instance, got {base!r}")
    groups = []
    for g in wrapper_groups:
        groups.append({k: v for k, v in g.items() if k not in own or k in ("params", "lr")})
    built = base(groups, **base_kwargs)
    if not isinstance(built, Optimizer):
        raise TypeError(f"base(...) must return a torch.optim.Optimizer, got {type(built).__name__}")
    return built


def sync_lr(wrapper_groups: List[Dict[str, Any]], base: Optimizer) -> None:
    """The wrapper's ``lr`` is the source of truth (LR schedulers and the hypergradient act on
    it); copy it into the base optimizer's groups before every base step."""
    for mine, theirs in zip(wrapper_groups, base.param_groups):
        theirs["lr"] = mine["lr"]
