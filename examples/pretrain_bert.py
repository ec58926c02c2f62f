"""Masked language-model pretraining of a tiny BERT with the moxco agent attached.

    python examples/pretrain_bert.py --steps 200 --optimizer adamw --url sqlite:///runs.db --run bert-adamw
    python examples/pretrain_bert.py --optimizer sgdm --random-scaling ...
    moxco audit bert-adamw --store sqlite:///runs.db --out bert-adamw.html

``BertForMaskedLM`` from a tiny ``BertConfig`` (random init), a WordPiece tokenizer trained
locally on the Python standard library's sources (see ``lm_common``), BERT's 15 % masking
(80/10/10), AdamW or SGD with momentum, optionally random scaling. ``--reference``,
``--save-final`` and ``--save-checkpoints`` as in ``pretrain_gpt2.py``.

Runs unchanged on a GPU (``--device`` defaults to ``cuda`` when one is visible).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_common  # noqa: E402


def build_model(args, vocab_size: int, pad_id: int):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                        max_position_embeddings=args.seq_len, pad_token_id=pad_id)
    torch.manual_seed(args.seed)
    return BertForMaskedLM(config)


def main(argv=None) -> int:
    args = lm_common.base_parser(__doc__.splitlines()[0]).parse_args(argv)
    stream = lm_common.TokenStream("bert", args.vocab_size, args.seq_len, args.corpus_bytes)
    model = build_model(args, stream.vocab_size, stream.special("[PAD]"))
    if args.save_checkpoints:
        Path(args.save_checkpoints).mkdir(parents=True, exist_ok=True)
        (Path(args.save_checkpoints) / "config.json").write_text(json.dumps(vars(args), indent=1))
    masking = lm_common.masked_inputs(stream, torch.Generator().manual_seed(args.seed + 1))
    lm_common.train(args, model, stream, masking, "bert")
    return 0


def probe_data(checkpoints_dir=None, max_batches: int = 4):
    """``moxco audit --data examples/pretrain_bert.py:probe_data``: ``(model_fn, probe batches)``;
    the masks of the probe set are drawn once, from a fixed seed, so every checkpoint sees the same."""
    args = lm_common.base_parser("").parse_args([])
    if checkpoints_dir is not None and (Path(checkpoints_dir) / "config.json").exists():
        vars(args).update(json.loads((Path(checkpoints_dir) / "config.json").read_text()))
    stream = lm_common.TokenStream("bert", args.vocab_size, args.seq_len, args.corpus_bytes)
    masking = lm_common.masked_inputs(stream, torch.Generator().manual_seed(10_000 + args.seed))
    pad = stream.special("[PAD]")
    return (lambda: build_model(args, stream.vocab_size, pad),
            lm_common.probe_batches(stream, masking, args.batch_size, max_batches))


if __name__ == "__main__":
    sys.exit(main())
