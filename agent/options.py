"""The agent's options: ``AgentOptions`` (every ``attach`` keyword with its default, validated) and
``GoodnessSettings``.

Each option is validated once, here, with a message that names the bad value; an unknown keyword is
a ``TypeError`` that names it and the closest valid one (``attach(..., reeval_evry=5)`` → "did you
mean 'reeval_every'?"). ``docs/agent.md`` describes what each option does.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
import random
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from torch import nn

from moxco.goodness import GOODNESS_FORMS
from moxco.policy import PolicyConfig
from moxco.wire import check_run_name

DECISION_MODES = ("sync", "async")
ADJECTIVES = ("brisk", "calm", "deft", "eager", "fleet", "keen", "lucid", "nimble", "quiet", "steady", "swift", "vivid")
NOUNS = ("basin", "cliff", "delta", "fjord", "glade", "mesa", "ridge", "saddle", "slope", "valley", "vale", "summit")


def default_run_name() -> str:
    """A readable, unique-enough run name: ``adjective-noun-YYYYmmdd-HHMMSS``."""
    rng = random.Random()
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}-{time.strftime('%Y%m%d-%H%M%S')}"


def default_url() -> str:
    """``$MOXCO_URL``, else ``sqlite:///moxco.db`` in the working directory."""
    return os.environ.get("MOXCO_URL") or f"sqlite:///{Path.cwd() / 'moxco.db'}"


GOODNESS_SHARPNESS = ("plain", "precond")  # which (λ̂, λ_target) pair goodness scores
SHARPNESS_HVPS = ("auto", "autograd", "finite_difference")
HESSIAN_TRACE_SAMPLES = 10  # Hutchinson samples per probe for hessian_trace=True


def check_url(url: str) -> str:
    """``url`` when it names a store the agent can write to: ``http(s)://host…`` (a collector),
    ``sqlite:…`` or ``postgresql…://…`` (``moxco.collector.store.normalize_url``'s rules; a plain path
    is a SQLite file); else ``ValueError`` that says what a URL looks like. Nothing is opened."""
    from urllib.parse import urlsplit

    if url.lower().startswith(("http://", "https://")):
        if not urlsplit(url).hostname:
            raise ValueError(f"url {url!r}: a collector URL is http(s)://host[:port]")
        return url
    from moxco.collector.store.engine import normalize_url

    try:
        normalized = normalize_url(url)
    except ValueError as exc:
        raise ValueError(f"url {url!r}: {exc}") from None
    if not normalized.startswith(("sqlite:", "postgresql")):
        raise ValueError(f"url {url!r}: the agent writes to sqlite:///path.db, postgresql://… or an http(s):// "
                         "collector")
    return url


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class GoodnessSettings:
    """How the agent scores goodness (MoXCo eq. 6, ``moxco.goodness.goodness``): ``tau`` the
    temperature τ, ``sharpness_target`` λ_target (None: ``k`` · the edge of stability of the
    optimizer's own lr, α, β, MoXCo Theorem 2), ``loss_target`` f_target, ``form`` ``"relative"``
    (``|λ̂/λ_target − 1|``, eq. 6, the default) or ``"eos"`` (the short paper's hinge ``(λ̂ − λ_target)_+``),
    ``sharpness`` which pair is ``λ̂`` against ``λ_target``: ``"plain"`` (``sharpness`` against
    ``k · λ_EOS``, the default) or ``"precond"`` (``sharpness_precond`` against ``k`` · the adaptive
    edge of stability ``2(1+β₁)/((1−β₁)η)``, Cohen et al. 2022: the pair Adam-family runs equilibrate;
    ``sharpness_target`` then replaces that edge)."""

    tau: float = 1.0
    sharpness_target: Optional[float] = None
    k: float = 1.0
    loss_target: float = 0.0
    form: str = "relative"
    sharpness: str = "plain"

    def __post_init__(self) -> None:
        for name in ("tau", "k"):
            value = getattr(self, name)
            if not (_finite(value) and value > 0):
                raise ValueError(f"goodness {name} must be a finite positive number, got {value!r}")
        if self.sharpness_target is not None and not (_finite(self.sharpness_target) and self.sharpness_target > 0):
            raise ValueError(f"goodness sharpness_target must be None or a finite positive number, "
                             f"got {self.sharpness_target!r}")
        if not _finite(self.loss_target):
            raise ValueError(f"goodness loss_target must be a finite number, got {self.loss_target!r}")
        if self.form not in GOODNESS_FORMS:
            raise ValueError(f"goodness form must be one of {GOODNESS_FORMS}, got {self.form!r}")
        if self.sharpness not in GOODNESS_SHARPNESS:
            raise ValueError(f"goodness sharpness must be one of {GOODNESS_SHARPNESS}, got {self.sharpness!r}")

    @classmethod
    def from_option(cls, value: Any) -> "GoodnessSettings":
        """``attach(goodness=...)``: None, a ``GoodnessSettings`` or a mapping of its fields."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"goodness must be a mapping such as {{'tau': 1.0}}, got {type(value).__name__}")
        _check_names(value, [f.name for f in fields(cls)], "goodness setting")
        return cls(**dict(value))


@dataclass(frozen=True)
class AgentOptions:
    """Every option of ``attach``, with its default (``docs/agent.md`` says what each does).

    Built from keywords by ``from_keywords`` (unknown names refused); ``goodness`` and ``policy``
    are normalised to ``GoodnessSettings`` and ``PolicyConfig``."""

    url: Optional[str] = None
    run: Optional[str] = None
    reeval_every: int = 10
    probe_every: int = 100
    reference: Any = None
    random_scaling: bool = False
    criterion: Optional[nn.Module] = None
    loss_fn: Optional[Callable[..., Any]] = None
    sharpness_iters: int = 1
    sharpness_refine: Optional[float] = 0.05
    sharpness_hvp: str = "auto"
    sharpness_precond: Optional[bool] = None
    hessian_trace: Any = False
    probe_data: Any = None
    probe_batches: int = 4
    goodness: Any = None
    policy: Any = None
    on_decision: Optional[Callable[..., Any]] = None
    decisions: Optional[str] = None
    decision_timeout: float = 5.0
    track_distance: bool = True
    start_step: Optional[int] = None
    seed: Optional[int] = None
    config: Optional[Mapping[str, Any]] = None
    scaler: Any = None
    store: Any = None
    token: Optional[str] = None
    transport: Optional[Mapping[str, Any]] = None
    manual_pre_step: bool = False
    resume: Any = False

    def __post_init__(self) -> None:
        for name in ("reeval_every", "probe_every", "start_step"):
            value = getattr(self, name)
            if name == "start_step" and value is None:
                continue
            if not _integer(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if not (isinstance(self.resume, bool) or self.resume == "must"):
            raise ValueError(f"resume must be False, True or 'must', got {self.resume!r}")
        if not _integer(self.sharpness_iters) or self.sharpness_iters < 1:
            raise ValueError(f"sharpness_iters must be a positive integer, got {self.sharpness_iters!r}")
        refine = self.sharpness_refine
        if refine is not None and not (isinstance(refine, (int, float)) and not isinstance(refine, bool)
                                       and 0 < refine <= 1):
            raise ValueError(f"sharpness_refine must be None or a number in (0, 1], got {refine!r}")
        if refine is not None:
            object.__setattr__(self, "sharpness_refine", float(refine))
        if self.seed is not None and not _integer(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not _integer(self.probe_batches) or self.probe_batches < 1:
            raise ValueError(f"probe_batches must be a positive integer, got {self.probe_batches!r}")
        if self.sharpness_hvp not in SHARPNESS_HVPS:
            raise ValueError(f"sharpness_hvp must be one of {SHARPNESS_HVPS}, got {self.sharpness_hvp!r}")
        if self.sharpness_precond not in (None, True, False):
            raise ValueError(f"sharpness_precond must be None (on for Adam-family optimizers), True or False, "
                             f"got {self.sharpness_precond!r}")
        trace = self.hessian_trace
        if not (isinstance(trace, bool) or (_integer(trace) and trace >= 0)):
            raise ValueError(f"hessian_trace must be True, False or a number of Hutchinson samples ≥ 0, got {trace!r}")
        object.__setattr__(self, "hessian_trace",
                           HESSIAN_TRACE_SAMPLES if trace is True else 0 if trace is False else int(trace))
        for name in ("reeval_every", "probe_every", "start_step", "sharpness_iters", "probe_batches", "seed"):
            if getattr(self, name) is not None:  # numpy integers become Python's
                object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("random_scaling", "track_distance", "manual_pre_step"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        for name in ("url", "token"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value.strip()):
                raise ValueError(f"{name} must be a non-empty string or None, got {value!r}")
        if self.url is not None:
            check_url(self.url)
        if self.run is not None:
            try:
                check_run_name(self.run)
            except ValueError as exc:
                raise ValueError(f"run {self.run!r}: {exc}") from None
        if self.criterion is not None and not isinstance(self.criterion, nn.Module):
            raise ValueError("criterion must be an nn.Module (e.g. nn.CrossEntropyLoss()), got "
                             f"{type(self.criterion).__name__}; for a plain function pass loss_fn=... and tell "
                             "the agent the targets with agent.targets(y)")
        for name in ("loss_fn", "on_decision"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ValueError(f"{name} must be callable or None, got {value!r}")
        if self.reference is not None and not isinstance(self.reference, (Mapping, str, os.PathLike)):
            raise ValueError("reference must be a state_dict or a checkpoint path, got "
                             f"{type(self.reference).__name__}")
        if self.decisions is not None and self.decisions not in DECISION_MODES:
            raise ValueError(f"decisions must be one of {DECISION_MODES} or None (sync in embedded mode, async over "
                             f"HTTP), got {self.decisions!r}")
        if not (_finite(self.decision_timeout) and self.decision_timeout > 0):
            raise ValueError(f"decision_timeout must be a finite number of seconds > 0, got {self.decision_timeout!r}")
        object.__setattr__(self, "decision_timeout", float(self.decision_timeout))
        for name in ("config", "transport"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Mapping):
                raise ValueError(f"{name} must be a mapping or None, got {type(value).__name__}")
        if self.scaler is not None and not callable(getattr(self.scaler, "is_enabled", None)):
            raise ValueError(f"scaler must be a torch.amp.GradScaler, got {type(self.scaler).__name__}")
        object.__setattr__(self, "goodness", GoodnessSettings.from_option(self.goodness))
        object.__setattr__(self, "policy", _policy(self.policy))

    def decision_mode(self, url: Optional[str]) -> str:
        """``decisions``, else its default for where the run is stored: ``sync`` for the embedded
        store (decisions applied at the step the configuration fixes), ``async`` over HTTP (the job
        never waits on the network)."""
        if self.decisions is not None:
            return self.decisions
        http = self.store is None and isinstance(url, str) and url.lower().startswith(("http://", "https://"))
        return "async" if http else "sync"

    @classmethod
    def from_keywords(cls, **keywords: Any) -> "AgentOptions":
        """``AgentOptions(**keywords)``, with a ``TypeError`` naming an unknown keyword and the
        closest valid one."""
        check_names(keywords)
        return cls(**keywords)


OPTION_NAMES = tuple(f.name for f in fields(AgentOptions))


def check_names(keywords: Mapping[str, Any]) -> None:
    """Raise ``TypeError`` for a keyword that is not an option of ``attach``, naming the closest
    valid one (for the integrations, which take ``attach``'s options and attach later)."""
    _check_names(keywords, OPTION_NAMES, "attach() option", error=TypeError)


def _check_names(given: Mapping[str, Any], valid, what: str, error: type = ValueError) -> None:
    for name in given:
        if name not in valid:
            close = difflib.get_close_matches(str(name), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(valid)}"
            raise error(f"unknown {what} {name!r}{hint}")


def _integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _policy(value: Any) -> PolicyConfig:
    if value is None:
        return PolicyConfig()
    if isinstance(value, PolicyConfig):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"policy must be a mapping such as {{'threshold': 0.9}}, got {type(value).__name__}")
    _check_names(value, [f.name for f in fields(PolicyConfig)], "policy setting")
    return PolicyConfig(**dict(value))
