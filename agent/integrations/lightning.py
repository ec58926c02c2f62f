"""The moxco agent in a Lightning ``Trainer``: ``Trainer(callbacks=[MoxcoCallback(...)])``.

``MoxcoCallback(module=None, **options)`` takes ``moxco.agent.attach``'s options. At ``on_fit_start``
it attaches the agent to the LightningModule (or to its submodule named ``module``, e.g. ``"model"``
for a ``self.model`` whose forward returns the loss) and the first optimizer.

What the agent must see is a forward call whose output is the loss (or ``criterion=``/``loss_fn=``):
``training_step`` is not a forward call, so either the LightningModule's ``forward`` returns the loss
and ``training_step`` calls ``self(batch)``, or ``module`` names the submodule that does (a Hugging
Face model given labels).

Lightning runs ``training_step`` and ``backward`` inside a closure that ``optimizer.step(closure)``
calls, i.e. *after* the optimizer's step pre-hooks. So the agent's pre-step work (the metrics at
``x_t`` with ``g_t``) is moved to Lightning's ``on_before_optimizer_step``, which runs after
backward and before gradient clipping and the update; the post-step work stays on the optimizer's
step post-hook. Gradient accumulation works (the hook fires once per optimizer step). Manual
optimization is not covered: attach with ``moxco.agent.attach`` in ``on_fit_start`` yourself.
"""

from __future__ import annotations

from typing import Any, Optional

import moxco.agent
from moxco.agent.options import check_names

try:
    from lightning.pytorch.callbacks import Callback
except ModuleNotFoundError:  # the standalone package
    from pytorch_lightning.callbacks import Callback


class MoxcoCallback(Callback):
    """Attach the moxco agent to a Lightning fit: ``Trainer(callbacks=[MoxcoCallback(run="x")])``."""

    def __init__(self, module: Optional[str] = None, epochs: bool = False, **attach_options: Any) -> None:
        self.module = module
        self.epochs = epochs
        check_names(attach_options)  # a misspelt option fails here, not when training starts
        self.options = attach_options
        self.agent: Optional[moxco.agent.Agent] = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError("moxco: MoxcoCallback supports automatic optimization; with manual optimization call "
                               "moxco.agent.attach(model, optimizer) yourself")
        if len(trainer.optimizers) != 1:
            raise RuntimeError(f"moxco: MoxcoCallback attaches to one optimizer, the module has {len(trainer.optimizers)}")
        model = pl_module if self.module is None else getattr(pl_module, self.module)
        optimizer = trainer.optimizers[0]
        options = dict(self.options)
        config = dict(options.pop("config", None) or {})
        config.setdefault("dtype", str(next(model.parameters()).dtype).replace("torch.", ""))
        config.setdefault("precision", str(trainer.precision))
        config.setdefault("integration", "lightning")
        options.setdefault("start_step", int(trainer.global_step))
        # Lightning calls optimizer.step(closure): a step pre-hook would run before forward/backward,
        # so the pre-step work runs from on_before_optimizer_step instead
        self.agent = moxco.agent.attach(model, optimizer, config=config, manual_pre_step=True, **options)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.agent is not None and self.epochs:
            self.agent.epoch()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.agent is not None:
            self.agent.before_optimizer_step()

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.agent is not None:
            self.agent.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.agent is not None:
            self.agent.close("failed")
