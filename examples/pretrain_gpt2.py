"""Causal language-model pretraining of a tiny GPT-2 with the moxco agent attached.

    python examples/pretrain_gpt2.py --steps 200 --optimizer adamw --url sqlite:///runs.db --run gpt2-adamw
    python examples/pretrain_gpt2.py --optimizer sgdm --random-scaling ...
    moxco audit gpt2-adamw --store sqlite:///runs.db --out gpt2-adamw.html

``GPT2LMHeadModel`` from a tiny ``GPT2Config`` (random init), a byte-level BPE tokenizer trained
locally on the Python standard library's sources (see ``lm_common``), AdamW or SGD with momentum,
optionally random scaling. The two-run way to get the global metrics (audit paper §3.2): run once
with ``--save-final xstar.pt``, then again with ``--reference xstar.pt`` (``convexity_ratio``,
``inst_gap_ref``, ``inst_smooth_ref``). Or save checkpoints (``--save-checkpoints DIR``) and
compute them afterwards: ``moxco audit --checkpoints DIR --reference xstar.pt
--data examples/pretrain_gpt2.py:probe_data``.

Runs unchanged on a GPU (``--device`` defaults to ``cuda`` when one is visible).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_common  # noqa: E402


def build_model(args, vocab_size: int, eos_id: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=args.seq_len, n_embd=args.hidden, n_layer=args.layers,
                        n_head=args.heads, bos_token_id=eos_id, eos_token_id=eos_id)
    torch.manual_seed(args.seed)
    return GPT2LMHeadModel(config)


def main(argv=None) -> int:
    args = lm_common.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    stream = lm_common.TokenStream("gpt2", args.vocab_size, args.seq_len, args.corpus_bytes)
    model = build_model(args, stream.vocab_size, stream.special("<|endoftext|>"))
    if args.save_checkpoints:
        Path(args.save_checkpoints).mkdir(parents=True, exist_ok=True)
        (Path(args.save_checkpoints) / "config.json").write_text(json.dumps(vars(args), indent=1))
    lm_common.train(args, model, stream, lm_common.causal_inputs, "gpt2")
    return 0


def probe_data(checkpoints_dir=None, max_batches: int = 4):
    """``moxco audit --data examples/pretrain_gpt2.py:probe_data``: ``(model_fn, probe batches)``.

    Rebuilds the model and tokenizer with the settings the checkpoints were saved with (the
    ``config.json`` that ``--save-checkpoints`` writes), and takes the held-out last 5 % of the
    token stream as the probe set."""
    args = lm_common.base_parser("").parse_args([])
    if checkpoints_dir is not None and (Path(checkpoints_dir) / "config.json").exists():
        vars(args).update(json.loads((Path(checkpoints_dir) / "config.json").read_text()))
    stream = lm_common.TokenStream("gpt2", args.vocab_size, args.seq_len, args.corpus_bytes)
    eos = stream.special("<|endoftext|>")
    return (lambda: build_model(args, stream.vocab_size, eos),
            lm_common.probe_batches(stream, lm_common.causal_inputs, args.batch_size, max_batches))


if __name__ == "__main__":
    sys.exit(main())
