"""The moxco agent in a Hugging Face ``Trainer``: ``Trainer(..., callbacks=[MoxcoCallback(...)])``.

``MoxcoCallback(**options)`` takes ``moxco.agent.attach``'s options (``url``, ``run``,
``reeval_every``, ``probe_every``, ``reference``, ``random_scaling``, ...). At ``on_train_begin`` it
attaches the agent to the Trainer's loss step and optimizer (the torch optimizer inside
accelerate's wrapper); at ``on_train_end`` it closes the agent (flushes, marks the run finished).

* **The loss.** The agent records the Trainer's own ``compute_loss(model, inputs)`` calls
  (``integrations.LossStep``) and replays them at other parameters, so whatever ``compute_loss``
  does (the model's ``.loss`` given ``labels``, a label smoother, a subclass computing
  ``F.cross_entropy`` on the logits) is the loss, with no extra call. The Trainer's gradient
  clipping and loss scaling are undone by the agent (raw ``g_t``).
* **What the Trainer knows** is stored too: its ``TrainingArguments`` in the run's config
  (``config["training_arguments"]``), the learning rate of every step (the agent's ``lr``), and
  each evaluation's metrics as the run's own series (``agent.log``, at the Trainer's global step).
* **Checkpoints.** At each ``on_save`` the agent's state (``Agent.state_dict``) is written into the
  Trainer's checkpoint folder (``moxco_agent.pt``); ``trainer.train(resume_from_checkpoint=…)``
  continues the same run from it (``attach(..., run=…, resume=True)`` and ``load_state_dict``), so
  every series continues exactly. A checkpoint without it continues the run of that name from its
  stored series.

The callback finds the Trainer (for ``compute_loss`` and the checkpoint path) on the call stack
of ``on_train_begin``; without it, it attaches to the model, whose forward must return the loss.

Epochs: the audit paper resets the gap/smoothness aggregates at each epoch start of multi-epoch
runs and never in pretraining runs (audit paper §2). ``epochs=None`` (default) declares epochs to
the agent when the Trainer trains by epochs (``max_steps`` not set) and not when it trains by steps;
``True``/``False`` force it.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from collections.abc import Mapping
from typing import Any, Optional, Tuple

import torch
from transformers import Trainer, TrainerCallback

import moxco.agent
from moxco.agent.integrations.common import LossStep, log_scalars
from moxco.agent.options import check_names

log = logging.getLogger("moxco.agent")

STATE_FILE = "moxco_agent.pt"


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


def find_trainer(depth: int = 16) -> Tuple[Optional[Trainer], Optional[str]]:
    """The ``Trainer`` whose training loop called this callback, and the checkpoint it resumes from
    (its ``resume_from_checkpoint``), from the call stack; ``(None, None)`` when not found."""
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                resume = frame.f_locals.get("resume_from_checkpoint")
                return candidate, resume if isinstance(resume, (str, os.PathLike)) else None
        return None, None
    finally:
        del frame


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class MoxcoCallback(TrainerCallback):
    """Attach the moxco agent to a ``transformers.Trainer``: ``callbacks=[MoxcoCallback(run="x")]``."""

    def __init__(self, epochs: Optional[bool] = None, **attach_options: Any) -> None:
        self.epochs = epochs
        check_names(attach_options)  # a misspelt option fails here, not when training starts
        self.options = attach_options
        self.agent: Optional[moxco.agent.Agent] = None
        self._trainer: Optional[Trainer] = None
        self._compute_loss: Any = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("moxco: the Trainer gave the callback no model/optimizer at on_train_begin")
        trainer, resume_from = find_trainer()
        options = dict(self.options)
        config = dict(options.pop("config", None) or {})
        dtype = next(model.parameters()).dtype
        config.setdefault("dtype", "bfloat16" if args.bf16 else "float16" if args.fp16 else str(dtype).replace("torch.", ""))
        config.setdefault("integration", "transformers.Trainer")
        config.setdefault("training_arguments", _json_safe(args.to_dict()))
        saved = self._saved_state(resume_from)
        if saved is not None:
            options.setdefault("run", saved["run"])
            options["resume"] = options.get("resume") or True
        elif int(state.global_step) > 0:  # resumed without the agent's state: the run of that name goes on
            options.setdefault("resume", True)
        options.setdefault("start_step", int(state.global_step))
        target = model
        if trainer is not None:
            target = self._loss_step(trainer)
        self.agent = moxco.agent.attach(target, torch_optimizer(optimizer), config=config, **options)
        if isinstance(target, LossStep):
            target.capture = self.agent.capture
            self.agent.capture.loop = "huggingface"
        if saved is not None:
            self.agent.load_state_dict(saved)
        if self.epochs is None:
            self.epochs = not (args.max_steps and args.max_steps > 0)

    def _loss_step(self, trainer: Trainer) -> LossStep:
        """Route ``trainer.compute_loss`` through a ``LossStep`` the agent attaches to."""
        original = self._compute_loss = trainer.compute_loss

        def step(model, inputs, *args, **kwargs):
            # compute_loss may pop from its inputs (labels, with a label smoother): the call the agent
            # recorded keeps its own
            return original(model, copy.copy(inputs) if isinstance(inputs, Mapping) else inputs, *args, **kwargs)

        loss_step = LossStep(trainer.model, step)

        def compute_loss(model, inputs, *args, **kwargs):
            loss_step.live = model
            return loss_step(inputs, *args, **kwargs)

        trainer.compute_loss = compute_loss
        self._trainer = trainer
        return loss_step

    @staticmethod
    def _saved_state(resume_from: Optional[str]) -> Optional[dict]:
        if resume_from is None:
            return None
        path = os.path.join(resume_from, STATE_FILE)
        if not os.path.exists(path):
            log.warning("moxco: the checkpoint %s has no agent state (%s): the run continues from its stored series",
                        resume_from, STATE_FILE)
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.agent is not None and self.epochs:
            self.agent.epoch()

    def on_save(self, args, state, control, **kwargs):
        if self.agent is None:
            return
        saved = self.agent.state_dict()  # every rank: the state's collectives-free; rank 0 flushes the writer
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            torch.save(saved, os.path.join(folder, STATE_FILE))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.agent is not None and metrics:
            log_scalars(self.agent, metrics, int(state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        if self.agent is not None:
            self.agent.close()
        if self._trainer is not None:
            del self._trainer.compute_loss  # the Trainer's own method again
            self._trainer = None

