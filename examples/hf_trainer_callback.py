"""The moxco agent in a Hugging Face ``Trainer``: one line, ``callbacks=[MoxcoCallback(...)]``.

    python examples/hf_trainer_callback.py --steps 30 --url sqlite:///runs.db --run hf-gpt2
    moxco audit hf-gpt2 --store sqlite:///runs.db

A tiny ``GPT2LMHeadModel`` trained with the Trainer's defaults (AdamW, linear schedule, gradient
clipping at 1.0) on the standard library's sources (``lm_common``). Runs unchanged on a GPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_common  # noqa: E402
from moxco.agent.integrations.huggingface import MoxcoCallback  # noqa: E402


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def main(argv=None) -> int:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--url", default=None)
    p.add_argument("--run", default=None)
    p.add_argument("--corpus-bytes", type=int, default=400_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    stream = lm_common.TokenStream("gpt2", 1024, 32, args.corpus_bytes)
    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=stream.vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                                  bos_token_id=0, eos_token_id=0))
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=8,
                                     learning_rate=1e-3, logging_steps=10, save_strategy="no", report_to=[],
                                     seed=args.seed, disable_tqdm=True, use_cpu=not torch.cuda.is_available())
        moxco_callback = MoxcoCallback(url=args.url, run=args.run, reeval_every=1, probe_every=10)
        trainer = Trainer(model=model, args=training, train_dataset=Blocks(stream.train), callbacks=[moxco_callback])
        trainer.train()
    agent = moxco_callback.agent
    print(f"run: {agent.run}  errors: {agent.errors or 'none'}")
    return 0 if not agent.errors else 1


if __name__ == "__main__":
    sys.exit(main())
