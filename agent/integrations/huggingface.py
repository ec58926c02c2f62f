"""The moxco agent in a Hugging Face ``Trainer``: ``Trainer(..., callbacks=[MoxcoCallback(...)])``.

``MoxcoCallback(**options)`` takes ``moxco.agent.attach``'s options (``url``, ``run``,
``reeval_every``, ``probe_every``, ``reference``, ``random_scaling``, ...). At ``on_train_begin`` it
attaches the agent to the Trainer's model and optimizer (the torch optimizer inside accelerate's
wrapper); at ``on_train_end`` it closes the agent (flushes, marks the run finished). A Hugging Face
model given ``labels`` returns its loss in ``.loss``, which is all the agent needs to replay the
step's batch; the Trainer's gradient clipping and loss scaling are undone by the agent (raw ``g_t``).

Epochs: the audit paper resets the gap/smoothness aggregates at each epoch start of multi-epoch
runs and never in pretraining runs (file 003, §2). ``epochs=None`` (default) declares epochs to the
agent when the Trainer trains by epochs (``max_steps`` not set) and not when it trains by steps;
``True``/``False`` force it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import TrainerCallback

import moxco.agent
from moxco.agent.options import check_names


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` under wrappers such as accelerate's ``AcceleratedOptimizer``
    (whose ``step`` forwards to ``.optimizer.step()``: the step hooks must sit on the inner one)."""
    seen = 0
    while type(optimizer).__name__ == "AcceleratedOptimizer" or (
            hasattr(optimizer, "optimizer") and isinstance(getattr(optimizer, "optimizer"), torch.optim.Optimizer)):
        optimizer = optimizer.optimizer
        seen += 1
        if seen > 8:
            break
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"moxco: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


class MoxcoCallback(TrainerCallback):
    """Attach the moxco agent to a ``transformers.Trainer``: ``callbacks=[MoxcoCallback(run="x")]``."""

    def __init__(self, epochs: Optional[bool] = None, **attach_options: Any) -> None:
        self.epochs = epochs
        check_names(attach_options)  # a misspelt option fails here, not when training starts
        self.options = attach_options
        self.agent: Optional[moxco.agent.Agent] = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("moxco: the Trainer gave the callback no model/optimizer at on_train_begin")
        options = dict(self.options)
        config = dict(options.pop("config", None) or {})
        dtype = next(model.parameters()).dtype
        config.setdefault("dtype", "bfloat16" if args.bf16 else "float16" if args.fp16 else str(dtype).replace("torch.", ""))
        config.setdefault("integration", "transformers.Trainer")
        options.setdefault("start_step", int(state.global_step))
        self.agent = moxco.agent.attach(model, torch_optimizer(optimizer), config=config, **options)
        if self.epochs is None:
            self.epochs = not (args.max_steps and args.max_steps > 0)

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.agent is not None and self.epochs:
            self.agent.epoch()

    def on_train_end(self, args, state, control, **kwargs):
        if self.agent is not None:
            self.agent.close()
