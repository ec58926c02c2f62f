"""``moxco.optim``: the optimizers of the MoXCo and Adam+CM papers, in the style of ``torch.optim``.

* :class:`MoXCo` — the inertial proximal wrapper around any ``torch.optim`` optimizer (MoXCo eq. 1-5),
  with the Phase-2 :meth:`MoXCo.commit` the decision policy triggers.
* :class:`SGDHD`, :class:`AdamHD` — hypergradient descent (Baydin et al. 2018), MoXCo's Phase 2.
* :class:`AdamCM`, :class:`AdamCG`, :class:`SGDCM`, :class:`SGDCG` — memory-augmented optimizers with a
  priority buffer of critical momenta / gradients (Adam+CM paper).
* :class:`SAM` — sharpness-aware minimisation around any base optimizer.
* :mod:`moxco.optim.prox` — prox operators: :class:`Identity`, :class:`L1`, :class:`ProxQuant`.

Every optimizer here has ``hyperparameters() -> dict`` (docs/optimizers.md, "For the agent").
"""

from moxco.optim.critical import AdamCG, AdamCM, SGDCG, SGDCM
from moxco.optim.hypergradient import AdamHD, SGDHD
from moxco.optim.moxco_wrapper import PHASE_COMMIT, PHASE_EXPLORE, MoXCo
from moxco.optim.prox import L1, Identity, ProxQuant, hard_quantize_
from moxco.optim.sam import SAM

__all__ = [
    "MoXCo",
    "PHASE_EXPLORE",
    "PHASE_COMMIT",
    "SGDHD",
    "AdamHD",
    "AdamCM",
    "AdamCG",
    "SGDCM",
    "SGDCG",
    "SAM",
    "Identity",
    "L1",
    "ProxQuant",
    "hard_quantize_",
]
