"""Shared pieces of ``pretrain_gpt2.py`` and ``pretrain_bert.py``: local text, a locally trained
tokenizer, batches, the training loop with the moxco agent attached.

Nothing is downloaded. The corpus is the Python standard library's own ``.py`` sources (always on
the machine), read in sorted order up to ``--corpus-bytes``; the tokenizer is trained on it with
Hugging Face ``tokenizers`` (byte-level BPE for GPT-2, WordPiece for BERT); the models are
``GPT2LMHeadModel`` / ``BertForMaskedLM`` built from tiny configs with random initialisation.

Every tensor is created on ``--device`` (default: ``cuda`` when a GPU is visible, else ``cpu``),
so the same command runs unchanged on a GPU machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch

DEFAULT_CORPUS_BYTES = 2_000_000
PROBE_FRACTION = 0.05  # the last 5 % of the token stream is held out as the probe set


def stdlib_text(max_bytes: int = DEFAULT_CORPUS_BYTES) -> List[str]:
    """The standard library's ``.py`` files (sorted, so every machine reads the same text), up to
    ``max_bytes`` characters in total; test suites and generated files are skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("test", "site-packages", "idlelib", "lib2to3") or "tests" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    if not texts:
        raise RuntimeError(f"no Python sources found under {root}")
    return texts


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(kind: str, texts: List[str], vocab_size: int):
    """A tokenizer trained on ``texts``: byte-level BPE (``kind="gpt2"``) or WordPiece (``"bert"``),
    both the same on every run and machine for the same text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "gpt2":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return tok
    if kind != "bert":
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    names = wordpiece_vocabulary(tok, texts, vocab_size)
    tok.model = models.WordPiece({token: i for i, token in enumerate(names)}, unk_token="[UNK]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return tok


def wordpiece_vocabulary(tok, texts: List[str], vocab_size: int) -> List[str]:
    """WordPiece's vocabulary as ``tokenizers``' ``WordPieceTrainer`` learns it (BPE merges over
    words whose non-initial characters are ``##``-prefixed symbols), made deterministic: that
    trainer numbers the ``##`` symbols in a hash map's order, which breaks ties between equally
    frequent pairs differently from process to process (huggingface/tokenizers#1794), so the same
    text gave different vocabularies. Here each ``##c`` is a private-use character, so the byte-pair
    trainer, whose alphabet is numbered in sorted order, runs the same merges every time. Returns
    the tokens, specials first, then sorted (ids do not change how WordPiece splits a word: the
    longest match in the vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = [[word for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))]
             for text in texts]
    chars = sorted({c for text in words for word in text for c in word[1:]})
    base = 0xF0000  # plane 15's private-use area: ##c is chr(base + rank of c)
    if len(chars) > 0xFFFFD - base or any(ord(c) >= base for text in words for word in text for c in word):
        raise ValueError("the corpus uses private-use characters, which this WordPiece training reserves")
    continuing = {c: chr(base + i) for i, c in enumerate(chars)}
    plain = {v: k for k, v in continuing.items()}
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator((" ".join(w[0] + "".join(continuing[c] for c in w[1:]) for w in text) for text in words),
                            trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False))
    learned = {("##" if t[0] in plain else "") + "".join(plain.get(c, c) for c in t)
               for t in bpe.get_vocab() if t not in BERT_SPECIALS}
    return BERT_SPECIALS + sorted(learned)


class TokenStream:
    """The corpus as one token stream cut into fixed-length blocks; a train and a probe part."""

    def __init__(self, kind: str, vocab_size: int, seq_len: int, corpus_bytes: int) -> None:
        texts = stdlib_text(corpus_bytes)
        self.tokenizer = train_tokenizer(kind, texts, vocab_size)
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.seq_len = seq_len
        ids: List[int] = []
        separator = self.tokenizer.token_to_id("<|endoftext|>" if kind == "gpt2" else "[SEP]")
        # BERT blocks get [CLS] ... [SEP] around seq_len − 2 body tokens; GPT-2 blocks are plain
        body = seq_len - 2 if kind == "bert" else seq_len
        for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False):
            ids.extend(encoding.ids)
            ids.append(separator)
        n_blocks = len(ids) // body
        blocks = torch.tensor(ids[: n_blocks * body], dtype=torch.long).view(n_blocks, body)
        if kind == "bert":
            cls = torch.full((n_blocks, 1), self.tokenizer.token_to_id("[CLS]"), dtype=torch.long)
            sep = torch.full((n_blocks, 1), self.tokenizer.token_to_id("[SEP]"), dtype=torch.long)
            blocks = torch.cat([cls, blocks, sep], 1)
        n_probe = max(1, int(PROBE_FRACTION * n_blocks))
        self.train, self.probe = blocks[:-n_probe], blocks[-n_probe:]

    def special(self, token: str) -> int:
        return self.tokenizer.token_to_id(token)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--optimizer", choices=("adamw", "sgdm"), default="adamw")
    p.add_argument("--lr", type=float, default=None, help="default: 1e-3 for AdamW, 0.05 for SGDM")
    p.add_argument("--momentum", type=float, default=0.9, help="SGDM momentum (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--random-scaling", action="store_true", help="x_{t+1} = x_t + s_t Δ_t, s_t ~ Exp(1) (audit §4.3)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=64, help="model width (default: %(default)s)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--corpus-bytes", type=int, default=DEFAULT_CORPUS_BYTES,
                   help="characters of standard-library source to train on (default: %(default)s)")
    p.add_argument("--device", default=default_device(), help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", default=None, help="moxco store URL (default: $MOXCO_URL, else sqlite:///moxco.db)")
    p.add_argument("--run", default=None, help="run name (default: generated)")
    p.add_argument("--reeval-every", type=int, default=1, help="steps between re-evaluations at x_{t-1}")
    p.add_argument("--probe-every", type=int, default=10, help="steps between sharpness/goodness/ratio probes")
    p.add_argument("--reference", default=None, help="x*: the final weights of an earlier run (--save-final of it); "
                   "enables inst_gap_ref, inst_smooth_ref and convexity_ratio")
    p.add_argument("--save-final", default=None, help="save the final state_dict here (the x* of a later run)")
    p.add_argument("--save-checkpoints", default=None,
                   help="save the parameters x_t into this directory every --checkpoint-every steps (checkpoint mode)")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--no-agent", action="store_true", help="train without moxco (for comparison)")
    p.add_argument("--quiet", action="store_true")
    return p


def make_optimizer(args, model: torch.nn.Module) -> torch.optim.Optimizer:
    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr or 1e-3, weight_decay=args.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=args.lr or 0.05, momentum=args.momentum)


def batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Shuffled blocks, reshuffled each pass, from a private generator (the global RNG is untouched)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(blocks), generator=gen)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield blocks[order[start : start + batch_size]]


def train(args, model: torch.nn.Module, stream: TokenStream, make_inputs: Callable[[torch.Tensor], Dict[str, torch.Tensor]],
          kind: str) -> Optional[str]:
    """The training loop: the user's code plus the one ``attach`` line. Returns the run name."""
    import moxco.agent

    if args.steps < 1:
        raise SystemExit("--steps must be at least 1")
    device = torch.device(args.device)
    model.to(device).train()
    opt = make_optimizer(args, model)
    agent = None
    if not args.no_agent:
        agent = moxco.agent.attach(
            model, opt, url=args.url, run=args.run, reeval_every=args.reeval_every, probe_every=args.probe_every,
            reference=args.reference, random_scaling=args.random_scaling, seed=args.seed,
            config={"example": kind, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                    "parameters": sum(p.numel() for p in model.parameters()), "device": str(device),
                    "batch_size": args.batch_size, "seq_len": args.seq_len, "vocab_size": stream.vocab_size},
        )
    ckpt_dir = Path(args.save_checkpoints) if args.save_checkpoints else None
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    data = batches(stream.train, args.batch_size, args.seed)
    started = time.perf_counter()
    losses = []
    for step in range(args.steps):
        block = next(data)
        inputs = {k: v.to(device) for k, v in make_inputs(block).items()}
        if ckpt_dir is not None and step % args.checkpoint_every == 0:
            # x_t: the parameters this step's gradient is taken at
            torch.save({"step": step, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}},
                       ckpt_dir / f"step_{step:06d}.pt")
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if not args.quiet and (step + 1) % max(1, args.steps // 10) == 0:
            print(f"step {step + 1}/{args.steps}  loss {losses[-1]:.4f}  {time.perf_counter() - started:.1f}s",
                  file=sys.stderr, flush=True)
    run = None
    if agent is not None:
        agent.close()
        run = agent.run
        if agent.errors:
            print(f"moxco agent errors: {json.dumps(agent.errors)}", file=sys.stderr)
    if args.save_final:
        Path(args.save_final).parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, args.save_final)
    if not args.quiet:
        print(json.dumps({"run": run, "first_loss": losses[0], "last_loss": losses[-1],
                          "ln_vocab": math.log(stream.vocab_size)}))
    return run


def causal_inputs(block: torch.Tensor) -> Dict[str, torch.Tensor]:
    """GPT-2: predict every next token (the model shifts the labels itself)."""
    return {"input_ids": block, "labels": block}


def masked_inputs(stream: TokenStream, generator: torch.Generator, mask_prob: float = 0.15):
    """BERT's masking (Devlin et al.): 15 % of the non-special tokens are predicted; of those 80 %
    become [MASK], 10 % a random token, 10 % stay. Drawn from ``generator`` (the global RNG is
    untouched, so dropout masks are the model's own business)."""
    specials = torch.tensor([stream.special(t) for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")])
    mask_id, vocab = stream.special("[MASK]"), stream.vocab_size

    def make(block: torch.Tensor) -> Dict[str, torch.Tensor]:
        labels = block.clone()
        candidates = ~torch.isin(block, specials)
        chosen = (torch.rand(block.shape, generator=generator) < mask_prob) & candidates
        labels[~chosen] = -100
        inputs = block.clone()
        action = torch.rand(block.shape, generator=generator)
        inputs[chosen & (action < 0.8)] = mask_id
        randomize = chosen & (action >= 0.8) & (action < 0.9)
        inputs[randomize] = torch.randint(len(specials), vocab, block.shape, generator=generator)[randomize]
        return {"input_ids": inputs, "attention_mask": torch.ones_like(inputs), "labels": labels}

    return make


def probe_batches(stream: TokenStream, make_inputs, batch_size: int, max_batches: int) -> List[Dict[str, torch.Tensor]]:
    """The held-out probe set (the last 5 % of the stream) as fixed batches, for checkpoint mode."""
    out = []
    for start in range(0, min(len(stream.probe), batch_size * max_batches) - batch_size + 1, batch_size):
        out.append(make_inputs(stream.probe[start : start + batch_size]))
    return out or [make_inputs(stream.probe)]


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))
