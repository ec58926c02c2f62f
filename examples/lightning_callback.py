"""The moxco agent in a Lightning ``Trainer``: one line, ``callbacks=[MoxcoCallback(...)]``.

    python examples/lightning_callback.py --steps 30 --url sqlite:///runs.db --run pl-gpt2
    moxco audit pl-gpt2 --store sqlite:///runs.db

A LightningModule around a tiny ``GPT2LMHeadModel``; ``MoxcoCallback(module="model")`` attaches the
agent to ``self.model``, whose forward (given labels) returns the loss. Runs unchanged on a GPU
(``accelerator="auto"``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_common  # noqa: E402
from moxco.agent.integrations.lightning import MoxcoCallback  # noqa: E402

try:
    import lightning.pytorch as pl
except ModuleNotFoundError:
    import pytorch_lightning as pl


class CausalLM(pl.LightningModule):
    def __init__(self, vocab_size: int, lr: float = 1e-3):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        self.model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                                          bos_token_id=0, eos_token_id=0))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--url", default=None)
    p.add_argument("--run", default=None)
    p.add_argument("--corpus-bytes", type=int, default=400_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-clip", type=float, default=1.0)
    args = p.parse_args(argv)
    stream = lm_common.TokenStream("gpt2", 1024, 32, args.corpus_bytes)
    pl.seed_everything(args.seed, verbose=False)
    loader = torch.utils.data.DataLoader(stream.train, batch_size=8, shuffle=True)
    callback = MoxcoCallback(module="model", url=args.url, run=args.run, reeval_every=1, probe_every=10)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="auto", devices=1, callbacks=[callback],
                         gradient_clip_val=args.gradient_clip, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(CausalLM(stream.vocab_size), loader)
    print(f"run: {callback.agent.run}  errors: {callback.agent.errors or 'none'}")
    return 0 if not callback.agent.errors else 1


if __name__ == "__main__":
    sys.exit(main())
