"""The moxco agent in a Lightning ``Trainer``: ``Trainer(callbacks=[MoxcoCallback(...)])``.

``MoxcoCallback(module=None, **options)`` takes ``moxco.agent.attach``'s options. At ``on_fit_start``
it attaches the agent to the LightningModule's ``training_step`` and the first optimizer.

* **The loss.** The agent records the module's own ``training_step(batch, batch_idx)`` calls
  (``integrations.LossStep``: the callback routes Lightning's calls through it) and replays them at
  other parameters, ``self.log`` silenced, so whatever the step returns (``F.cross_entropy(self(x),
  y)``, a dict with ``"loss"``) is the loss, with no extra call. ``module="model"`` attaches to that
  submodule instead (its forward must return the loss, e.g. a Hugging Face model given labels).
* **When.** Lightning runs ``training_step`` and ``backward`` inside the closure
  ``optimizer.step(closure)`` calls, after the optimizer's step pre-hooks, so the agent's pre-step
  work (the metrics at ``x_t`` with ``g_t``) runs from ``on_before_optimizer_step`` (after backward,
  before gradient clipping and the update); the post-step work stays on the optimizer's step
  post-hook. Gradient accumulation works (the hook fires once per optimizer step). One optimizer,
  automatic optimization; with manual optimization attach with ``moxco.agent.attach`` yourself.
* **What Lightning knows** is stored too: the module's ``hparams`` in the run's config
  (``config["hparams"]``), the learning rate of every step (the agent's ``lr``), and the metrics
  logged during validation (``trainer.callback_metrics`` at the end of each validation, as the
  run's own series at the global step).
* **Checkpoints.** The callback's state in Lightning's checkpoints is the agent's
  (``Agent.state_dict``); ``trainer.fit(..., ckpt_path=…)`` continues the same run from it, so every
  series continues exactly. The end of fitting closes the agent, an exception marks the run failed.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, Dict, Optional

import moxco.agent
from moxco.agent.integrations.common import LossStep, log_scalars
from moxco.agent.options import check_names

try:
    from lightning.pytorch.callbacks import Callback
except ModuleNotFoundError:  # the standalone package
    from pytorch_lightning.callbacks import Callback

log = logging.getLogger("moxco.agent")


def _quiet(pl_module: Any):
    """A replay of ``training_step``: ``self.log``/``self.log_dict`` do nothing."""

    @contextlib.contextmanager
    def quiet():
        noop = lambda *args, **kwargs: None  # noqa: E731
        pl_module.log, pl_module.log_dict = noop, noop
        try:
            yield
        finally:
            del pl_module.log, pl_module.log_dict

    return quiet


class MoxcoCallback(Callback):
    """Attach the moxco agent to a Lightning fit: ``Trainer(callbacks=[MoxcoCallback(run="x")])``."""

    def __init__(self, module: Optional[str] = None, epochs: bool = False, **attach_options: Any) -> None:
        self.module = module
        self.epochs = epochs
        check_names(attach_options)  # a misspelt option fails here, not when training starts
        self.options = attach_options
        self.agent: Optional[moxco.agent.Agent] = None
        self._saved: Optional[Dict[str, Any]] = None  # from the checkpoint fit resumes from
        self._patched: Optional[Any] = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError("moxco: MoxcoCallback supports automatic optimization; with manual optimization call "
                               "moxco.agent.attach(model, optimizer) yourself")
        if len(trainer.optimizers) != 1:
            raise RuntimeError(f"moxco: MoxcoCallback attaches to one optimizer, the module has {len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        options = dict(self.options)
        config = dict(options.pop("config", None) or {})
        model = pl_module if self.module is None else getattr(pl_module, self.module)
        config.setdefault("dtype", str(next(model.parameters()).dtype).replace("torch.", ""))
        config.setdefault("precision", str(trainer.precision))
        config.setdefault("integration", "lightning")
        hparams = getattr(pl_module, "hparams", None)
        if hparams:
            config.setdefault("hparams", json.loads(json.dumps(dict(hparams), default=str)))
        saved, self._saved = self._saved, None
        if saved is not None:
            options.setdefault("run", saved["run"])
            options["resume"] = options.get("resume") or True
        options.setdefault("start_step", int(trainer.global_step))
        target = model
        if self.module is None:  # Lightning calls training_step through the module's attribute: route it
            target = LossStep(pl_module, lambda module, *args, **kwargs: type(module).training_step(module, *args,
                                                                                                    **kwargs),
                              quiet=_quiet(pl_module))
            loss_step = target
            pl_module.training_step = lambda *args, **kwargs: loss_step(*args, **kwargs)  # (not a submodule)
            self._patched = pl_module
        # Lightning calls optimizer.step(closure): a step pre-hook would run before forward/backward,
        # so the pre-step work runs from on_before_optimizer_step instead
        self.agent = moxco.agent.attach(target, optimizer, config=config, manual_pre_step=True, **options)
        self.agent.capture.loop = "lightning"
        if isinstance(target, LossStep):
            target.capture = self.agent.capture
        if saved is not None:
            self.agent.load_state_dict(saved)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.agent is not None and self.epochs:
            self.agent.epoch()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.agent is not None:
            self.agent.before_optimizer_step()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.agent is not None and not trainer.sanity_checking:
            log_scalars(self.agent, dict(trainer.callback_metrics), int(trainer.global_step))

    def state_dict(self) -> Dict[str, Any]:
        """The agent's state, saved in Lightning's checkpoints."""
        return {"agent": self.agent.state_dict()} if self.agent is not None else {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """A checkpoint's agent state: restored when the agent attaches (``on_fit_start``)."""
        self._saved = state_dict.get("agent")

    def _finish(self, status: str) -> None:
        if self.agent is not None:
            self.agent.close(status)
        if self._patched is not None:
            del self._patched.training_step  # the module's own method again
            self._patched = None

    def on_fit_end(self, trainer, pl_module) -> None:
        self._finish("finished")

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._finish("failed")
