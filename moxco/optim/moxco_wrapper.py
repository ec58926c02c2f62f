"""MoXCo: the inertial proximal wrapper around any ``torch.optim`` optimizer (MoXCo eq. 1-5, Alg. 1).

With ``θ_t`` the iterate and ``m_t = θ_t − θ_{t−1}`` its last displacement, one step is

    u_t     = θ_t + α_t m_t                          (eq. 1, the inertial point)
    v_t     = θ_t + β_t m_t                          (eq. 2, where the gradient is taken)
    Δ_t     = Optimizer(∇f(v_t), v_t, γ)             (eq. 5, the base optimizer as a black box)
    θ_{t+1} = Prox(u_t − η Δ_t)                      (eq. 3-4)

The model's parameters hold ``v_t`` between steps, so the user's ordinary forward/backward takes
the gradient exactly where eq. 2 asks. A step lets the base optimizer update the parameters in
place from ``v_t`` to its proposal ``p_t = v_t − η Δ_t`` (the base is built with step size ``η``,
so ``η Δ_t`` is whatever displacement it makes: ``η g`` for SGD, ``η m̂/(√v̂+ε)`` for Adam, which
is MoXCo A.5.3's Adam wrapping with ``γ = η``), and then sets

    θ_{t+1} = Prox(p_t + (α_t − β_t) m_t)            (= Prox(u_t − η Δ_t), since u_t − v_t = (α_t−β_t) m_t)
    m_{t+1} = θ_{t+1} − θ_t,        parameters ← v_{t+1} = θ_{t+1} + β_{t+1} m_{t+1}.

Written this way, ``α = β = 0`` with the identity prox leaves the base optimizer's result bit for
bit: MoXCo is then exactly its base. ``θ`` itself (for evaluation and checkpoints) is stored in the
optimizer state; :meth:`MoXCo.theta` swaps it into the model for a ``with`` block.

Schedules (per parameter group): ``alpha`` is a constant in [0, 1), ``"increasing"`` for
``α_t = (3t−1)/(3t+1)`` (MoXCo A.4.5; ``t`` = steps taken, so ``α_1 = 0.5``), or a callable
``t → α_t``; ``beta`` is a constant ≥ 0, ``"random"`` for ``β_t ~ U[0, 1)`` drawn every step from
the optimizer's own seeded generator (MoXCo §3.3), or a callable ``t → β_t``.

Phase 2 (:meth:`MoXCo.commit`, what the decision policy triggers): α and β become the restart
constants (0.1, 0.1 by default), the inertia is restarted (``θ_{−1} ← θ_t``, Algorithm 1 line 12)
and the step size is adapted by hypergradient descent (Baydin et al. 2018, as in
:mod:`moxco.optim.hypergradient`) on the base's unit-step direction ``s_t = Δ_t``:
``η_{t+1} = η_t + β_hg ⟨∇f(v_{t+1}), s_t⟩``. With α = β = 0 and an SGD (Adam) base this is exactly
SGD-HD (Adam-HD). The hypergradient uses the gradient at ``v_{t+1}``, the only one computed.
:meth:`MoXCo.explore` is Phase 1 on request (a decision with ``phase: 1``): it sets the constants
given and, from Phase 2, returns to exploring with η where the hypergradient left it.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from moxco.goodness import eos_sharpness
from moxco.optim._common import BaseSpec, build_base, check_lr, check_nonneg, check_unit_interval, params_with_grad, sync_lr, use_foreach
from moxco.optim.hypergradient import check_rule, hypergradient_update
from moxco.optim.prox import Identity, prox_from_spec, prox_to_spec

__all__ = ["MoXCo", "moxco_inertial_update", "alpha_at", "PHASE_EXPLORE", "PHASE_COMMIT"]

PHASE_EXPLORE = 1
PHASE_COMMIT = 2

AlphaSpec = Union[float, str, Callable[[int], float]]
BetaSpec = Union[float, str, Callable[[int], float]]

_OWN_KEYS = ("alpha", "beta", "prox", "hypergrad_lr", "hypergrad_rule")


def alpha_at(spec: AlphaSpec, t: int) -> float:
    """``α_t`` for a schedule spec: a constant, ``"increasing"`` (``(3t−1)/(3t+1)``, ``t ≥ 1``) or a callable."""
    if isinstance(spec, str):
        if spec != "increasing":
            raise ValueError(f"alpha schedule must be a number, 'increasing' or a callable, got {spec!r}")
        t = max(int(t), 1)
        return (3.0 * t - 1.0) / (3.0 * t + 1.0)
    if callable(spec):
        return float(spec(int(t)))
    return float(spec)


def _beta_at(spec: BetaSpec, t: int, generator: torch.Generator) -> float:
    if isinstance(spec, str):
        if spec != "random":
            raise ValueError(f"beta schedule must be a number, 'random' or a callable, got {spec!r}")
        return float(torch.rand((), generator=generator, dtype=torch.float64))
    if callable(spec):
        return float(spec(int(t)))
    return float(spec)


def _beta_expected(spec: BetaSpec, t: int) -> float:
    if isinstance(spec, str):
        return 0.5
    if callable(spec):
        return float(spec(int(t)))
    return float(spec)


def _check_alpha_spec(alpha: Any) -> AlphaSpec:
    if isinstance(alpha, str):
        if alpha != "increasing":
            raise ValueError(f"Invalid alpha: {alpha!r} (a number in [0, 1), 'increasing' or a callable t -> alpha_t)")
        return alpha
    if callable(alpha):
        return alpha
    return check_unit_interval(alpha, "alpha")


def _check_beta_spec(beta: Any) -> BetaSpec:
    if isinstance(beta, str):
        if beta != "random":
            raise ValueError(f"Invalid beta: {beta!r} (a number ≥ 0, 'random' or a callable t -> beta_t)")
        return beta
    if callable(beta):
        return beta
    return check_nonneg(beta, "beta")


@torch.no_grad()
def moxco_inertial_update(
    params: List[Tensor], thetas: List[Tensor], inertias: List[Tensor], *, alpha: float, beta: float,
    beta_next: float, prox: Optional[Callable[..., None]], step: int, lr: float, foreach: bool = False,
) -> None:
    """The wrapper's part of one MoXCo step (eq. 1-4), after the base optimizer moved ``params``
    from ``v_t`` to its proposal ``p_t = v_t − η Δ_t``.

    In place: ``θ ← Prox(p_t + (α−β) m)``, ``m ← θ_new − θ_old``, ``params ← θ_new + β_next m``.
    ``step`` is the 1-based index of this step (for the prox homotopy), ``lr`` the step size η.
    """
    if not params:
        return
    coef = float(alpha) - float(beta)
    if foreach:
        if coef != 0.0:
            torch._foreach_add_(params, inertias, alpha=coef)
        if prox is not None:
            prox(params, step=step, lr=lr)
        torch._foreach_copy_(inertias, params)
        torch._foreach_sub_(inertias, thetas)
        torch._foreach_copy_(thetas, params)
        if beta_next != 0.0:
            torch._foreach_add_(params, inertias, alpha=float(beta_next))
        return
    for p, m in zip(params, inertias):
        if coef != 0.0:
            p.add_(m, alpha=coef)
    if prox is not None:
        prox(params, step=step, lr=lr)
    for p, th, m in zip(params, thetas, inertias):
        m.copy_(p).sub_(th)
        th.copy_(p)
        if beta_next != 0.0:
            p.add_(m, alpha=float(beta_next))


class MoXCo(Optimizer):
    """MoXCo (Momentum eXploration and Commit) around a black-box ``torch.optim`` optimizer.

    Args:
        params: parameters or parameter groups (groups may carry base-optimizer keys such as
            ``weight_decay`` and the MoXCo keys ``lr``, ``alpha``, ``beta``, ``prox``, ``hypergrad_lr``).
        base: the base optimizer: a ``torch.optim.Optimizer`` class (or factory
            ``base(param_groups, lr=..., **base_kwargs)``), or an optimizer already built over
            exactly these parameters.
        lr: the step size η (given to the base; required unless ``base`` is an instance).
        alpha: inertia ``α``: constant in [0, 1), ``"increasing"`` or ``t → α_t`` (default 0.9).
        beta: gradient-point extrapolation ``β``: constant ≥ 0, ``"random"`` (default) or ``t → β_t``.
        prox: a prox operator from :mod:`moxco.optim.prox` (default identity).
        hypergrad_lr: hypergradient step ``β_hg`` used in Phase 2 (1e-3, MoXCo A.4).
        hypergrad_rule: ``"additive"`` (Baydin et al.'s default) or ``"multiplicative"``
            (scale-free, keeps η > 0; see :mod:`moxco.optim.hypergradient`).
        seed: seed of the generator behind ``beta="random"`` (default: drawn from torch's global RNG
            at construction when a group uses ``"random"``, so ``torch.manual_seed`` makes runs
            reproducible; the global RNG is not touched otherwise).
        **base_kwargs: passed to ``base`` when it is a class (``betas``, ``momentum``, …).

    The parameters hold ``v_t`` between steps; use ``with opt.theta(): ...`` to evaluate or save ``θ_t``.
    """

    def __init__(self, params, base: BaseSpec, lr: Optional[float] = None, alpha: AlphaSpec = 0.9,
                 beta: BetaSpec = "random", prox: Optional[Callable[..., None]] = None, *,
                 hypergrad_lr: float = 1e-3, hypergrad_rule: str = "additive", seed: Optional[int] = None,
                 **base_kwargs: Any):
        lr_from_base = lr is None
        if lr is None:
            if not isinstance(base, Optimizer):
                raise ValueError("lr is required when base is an optimizer class (it is the step size η given to the base)")
            lr = float(base.param_groups[0]["lr"])
        check_lr(lr)
        alpha = _check_alpha_spec(alpha)
        beta = _check_beta_spec(beta)
        check_nonneg(hypergrad_lr, "hypergrad_lr")
        if prox is not None and not callable(prox):
            raise ValueError(f"prox must be a prox operator (callable), got {prox!r}")
        defaults = dict(lr=lr, alpha=alpha, beta=beta, prox=prox if prox is not None else Identity(), hypergrad_lr=hypergrad_lr,
                        hypergrad_rule=check_rule(hypergrad_rule))
        self._group_state: List[Dict[str, Any]] = []
        super().__init__(params, defaults)
        if isinstance(base, Optimizer) and lr_from_base:
            # a prebuilt base without an explicit lr keeps its own per-group step sizes
            for mine, theirs in zip(self.param_groups, base.param_groups):
                mine["lr"] = float(theirs["lr"])
        self.base: Optimizer = build_base(self.param_groups, base, base_kwargs, _OWN_KEYS)
        if seed is None:
            # only a random β needs the generator; do not consume the global RNG otherwise
            uses_random = any(isinstance(g["beta"], str) for g in self.param_groups)
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64)) if uses_random else 0
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(int(seed))
        self.phase: int = PHASE_EXPLORE
        self.committed_at: Optional[int] = None

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["alpha"] = _check_alpha_spec(group["alpha"])
        group["beta"] = _check_beta_spec(group["beta"])
        check_lr(group["lr"])
        self._group_state.append({"step": 0, "beta": 0.0})
        if getattr(self, "base", None) is not None:
            self.base.add_param_group({k: v for k, v in group.items() if k not in _OWN_KEYS or k in ("params", "lr")})

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def step(self, closure=None):
        """One MoXCo step. The gradients in ``.grad`` must have been taken at the parameters'
        current values (``v_t``); a ``closure`` is evaluated once, before the step, to get them."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        active: List[List[Tensor]] = []
        for group in self.param_groups:
            params = params_with_grad(group)
            active.append(params)
            for p in params:
                state = self.state[p]
                if "theta" not in state:
                    # before the first step the parameters hold θ_0 = v_0 (m_0 = 0)
                    state["theta"] = p.detach().clone(memory_format=torch.preserve_format)
                    state["inertia"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if self.phase == PHASE_COMMIT and params:
                self._hypergradient_step(group, params)

        sync_lr(self.param_groups, self.base)
        self.base.step()

        for group, gstate, params in zip(self.param_groups, self._group_state, active):
            if not params:
                continue
            t = gstate["step"]
            lr = float(group["lr"])
            if self.phase == PHASE_COMMIT:
                self._record_direction(params, lr)
            alpha = alpha_at(group["alpha"], t)
            beta_next = _beta_at(group["beta"], t + 1, self._generator)
            states = [self.state[p] for p in params]
            moxco_inertial_update(
                params, [s["theta"] for s in states], [s["inertia"] for s in states], alpha=alpha,
                beta=gstate["beta"], beta_next=beta_next, prox=group["prox"], step=t + 1, lr=lr,
                foreach=use_foreach(params, None),
            )
            gstate["step"] = t + 1
            gstate["beta"] = beta_next
        return loss

    def _hypergradient_step(self, group: Dict[str, Any], params: List[Tensor]) -> None:
        """Phase 2: ``η ← η + β_hg ⟨g_t, s_{t−1}⟩``, then snapshot ``v_t`` to measure ``s_t``."""
        states = [self.state[p] for p in params]
        prev = [s.get("hd_direction") for s in states]
        if group["hypergrad_lr"] != 0 and all(d is not None for d in prev) and all(s.get("hd_valid", False) for s in states):
            group["lr"] = hypergradient_update(float(group["lr"]), [p.grad for p in params], prev,  # type: ignore[arg-type]
                                               float(group["hypergrad_lr"]), group["hypergrad_rule"])
        for p, s in zip(params, states):
            if s.get("hd_direction") is None:
                s["hd_direction"] = p.detach().clone(memory_format=torch.preserve_format)
            else:
                s["hd_direction"].copy_(p)
            s["hd_valid"] = False

    def _record_direction(self, params: List[Tensor], lr: float) -> None:
        """After the base step: ``s_t = (v_t − p_t) / η`` (the base's unit-step direction Δ_t)."""
        for p in params:
            s = self.state[p]
            d = s["hd_direction"]
            d.sub_(p)
            if lr != 0.0:
                d.div_(lr)
            else:
                d.zero_()
            s["hd_valid"] = True

    # ------------------------------------------------------------------ phase 2

    def commit(self, alpha: float = 0.1, beta: float = 0.1, lr: Optional[float] = None, *, reset_inertia: bool = True) -> bool:
        """Switch to Phase 2 (commit): α, β become the constants given, the inertia restarts from the
        current ``θ`` (``θ_{−1} ← θ_t``) and the step size is adapted by hypergradient descent from
        ``lr`` (default: the current one). Call it between ``step()`` and the next forward pass.
        Returns True when it switched, False when already committed (a second call is a no-op)."""
        if self.phase == PHASE_COMMIT:
            return False
        alpha = check_unit_interval(alpha, "alpha")
        beta = check_nonneg(beta, "beta")
        if lr is not None:
            lr = check_lr(lr)
        with torch.no_grad():
            for group, gstate in zip(self.param_groups, self._group_state):
                group["alpha"] = alpha
                group["beta"] = beta
                if lr is not None:
                    group["lr"] = lr
                for p in group["params"]:
                    state = self.state.get(p)
                    if not state or "theta" not in state:
                        continue
                    if reset_inertia:
                        state["inertia"].zero_()
                    p.copy_(state["theta"])
                    if not reset_inertia and beta != 0.0:
                        p.add_(state["inertia"], alpha=beta)
                    state.pop("hd_direction", None)
                    state.pop("hd_valid", None)
                gstate["beta"] = beta
        self.phase = PHASE_COMMIT
        self.committed_at = int(self._group_state[0]["step"]) if self._group_state else 0
        return True

    def explore(self, alpha: Optional[float] = None, beta: Optional[float] = None, lr: Optional[float] = None) -> bool:
        """Phase 1 (exploration, Algorithm 1 lines 3-7), with α, β and the step size η set to the
        constants given (each left as it is when None): what a decision with ``phase: 1`` asks.

        In Phase 1 it only changes the given hyper-parameters. From Phase 2 it returns to
        exploring: the hypergradient adaptation of η stops (η stays where it got to, unless ``lr``
        is given) and ``committed_at`` is cleared; the inertia ``m_t`` is kept, so the next step
        continues from the current displacement. A new β moves the parameters to
        ``v_t = θ_t + β m_t``, where the next gradient is taken. Call it between ``step()`` and the
        next forward pass. Returns True when the phase changed (from 2 to 1)."""
        if alpha is not None:
            alpha = check_unit_interval(alpha, "alpha")
        if beta is not None:
            beta = check_nonneg(beta, "beta")
        if lr is not None:
            lr = check_lr(lr)
        with torch.no_grad():
            for group, gstate in zip(self.param_groups, self._group_state):
                if alpha is not None:
                    group["alpha"] = alpha
                if lr is not None:
                    group["lr"] = lr
                if beta is not None:
                    group["beta"] = beta
                for p in group["params"]:
                    state = self.state.get(p)
                    if not state or "theta" not in state:
                        continue
                    if beta is not None:
                        p.copy_(state["theta"]).add_(state["inertia"], alpha=beta)
                    state.pop("hd_direction", None)
                    state.pop("hd_valid", None)
                if beta is not None:
                    gstate["beta"] = beta
        changed = self.phase != PHASE_EXPLORE
        self.phase = PHASE_EXPLORE
        self.committed_at = None
        return changed

    # ------------------------------------------------------------------ θ for evaluation

    def theta_tensors(self) -> List[Tensor]:
        """``θ_t`` for every parameter, in ``param_groups`` order (the state tensors themselves, or the
        parameter where no step has been taken yet). Read-only by convention."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                out.append(state["theta"] if state and "theta" in state else p.detach())
        return out

    @contextlib.contextmanager
    def theta(self) -> Iterator[None]:
        """``with opt.theta(): ...`` — the parameters hold ``θ_t`` inside the block (evaluate, save a
        checkpoint) and are restored bit for bit to ``v_t`` on exit."""
        swapped = []
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state.get(p)
                    if state and "theta" in state:
                        swapped.append((p, p.detach().clone()))
                        p.copy_(state["theta"])
        try:
            yield
        finally:
            with torch.no_grad():
                for p, saved in swapped:
                    p.copy_(saved)

    @torch.no_grad()
    def finalize_prox(self) -> None:
        """Apply each group's final projection (``prox.finalize_``, e.g. ProxQuant's hard sign
        quantisation) to ``θ``, restart the inertia and put ``θ`` in the parameters."""
        for group in self.param_groups:
            finalize = getattr(group["prox"], "finalize_", None)
            if finalize is None:
                continue
            params = list(group["params"])
            for p in params:
                state = self.state.get(p)
                if state and "theta" in state:
                    p.copy_(state["theta"])
            finalize(params)
            for p in params:
                state = self.state.get(p)
                if state and "theta" in state:
                    state["theta"].copy_(p)
                    state["inertia"].zero_()

    # ------------------------------------------------------------------ agent-facing API

    def current_alpha(self, group_index: int = 0) -> float:
        """The α the next step will use."""
        return alpha_at(self.param_groups[group_index]["alpha"], self._group_state[group_index]["step"])

    def current_beta(self, group_index: int = 0) -> float:
        """The β of the point the parameters hold now (where the next gradient is taken)."""
        return float(self._group_state[group_index]["beta"])

    def hyperparameters(self) -> Dict[str, Any]:
        """What an observer records: phase, step size, current α and β, and the EOS sharpness
        ``2(1+α)/(η(1+2β))`` (Theorem 2) with β's expected value (0.5 for ``"random"``).
        Values are those of parameter group 0."""
        group, gstate = self.param_groups[0], self._group_state[0]
        lr = float(group["lr"])
        alpha = self.current_alpha(0)
        beta_expected = _beta_expected(group["beta"], gstate["step"])
        try:
            eos = eos_sharpness(lr, alpha, beta_expected)
        except ValueError:
            eos = math.nan
        return {
            "optimizer": "MoXCo",
            "base": type(self.base).__name__,
            "phase": self.phase,
            "step": gstate["step"],
            "lr": lr,
            "alpha": alpha,
            "beta": self.current_beta(0),
            "beta_expected": beta_expected,
            "hypergrad_lr": float(group["hypergrad_lr"]),
            "hypergrad_rule": group["hypergrad_rule"],
            "eos_sharpness": eos,
            "committed_at": self.committed_at,
        }

    def eos_sharpness(self) -> float:
        """``λ_EOS = 2(1+α)/(η(1+2β))`` with the current η, α and expected β (MoXCo Theorem 2)."""
        return float(self.hyperparameters()["eos_sharpness"])

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        # plain data only (torch.load(weights_only=True) must read it back): prox operators of
        # moxco.optim.prox become dicts; user callables (custom prox, schedules) stay objects
        sd["param_groups"] = [dict(g, prox=prox_to_spec(g["prox"])) for g in sd["param_groups"]]
        sd["moxco"] = {
            "phase": self.phase,
            "committed_at": self.committed_at,
            "groups": copy.deepcopy(self._group_state),
            "generator": self._generator.get_state(),
        }
        sd["base"] = self.base.state_dict()
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("moxco", None)
        base_sd = state_dict.pop("base", None)
        if extra is None or base_sd is None:
            raise ValueError("not a MoXCo state dict (keys 'moxco' and 'base' missing)")
        state_dict["param_groups"] = [dict(g, prox=prox_from_spec(g.get("prox"))) if "prox" in g else g
                                      for g in state_dict["param_groups"]]
        super().load_state_dict(state_dict)
        self.base.load_state_dict(base_sd)
        if len(extra["groups"]) != len(self.param_groups):
            raise ValueError(f"state dict has {len(extra['groups'])} MoXCo groups, the optimizer {len(self.param_groups)}")
        self._group_state = copy.deepcopy(extra["groups"])
        self.phase = int(extra["phase"])
        self.committed_at = extra["committed_at"]
        self._generator.set_state(extra["generator"])
