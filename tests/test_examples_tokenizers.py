"""The pretraining examples' tokenizers (``examples/lm_common.py``) are the same in every process for
the same text: ``tokenizers``' own WordPiece trainer numbered its ``##`` symbols in a hash map's
order and broke ties between equally frequent pairs differently from run to run (on 300 KB of the
corpus, four different vocabularies in five processes), so BERT runs could not be repeated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VOCABULARY = """
import json, sys
sys.path.insert(0, {examples!r})
import lm_common
tok = lm_common.train_tokenizer({kind!r}, lm_common.stdlib_text(300_000), 1024)
words = ["ExtendedContext", "getcontext", "self._context_value", "isinstance(x, int)"]
print(json.dumps([tok.get_vocab(), [tok.encode(w, add_special_tokens=False).tokens for w in words]]))
"""


def trained(kind: str):
    code = VOCABULARY.format(examples=str(ROOT / "examples"), kind=kind)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_tokenizer_trained_in_three_processes_is_the_same_each_time(kind):
    (vocab, pieces), *others = [trained(kind) for _ in range(3)]
    assert len(vocab) == 1024
    for other in others:
        assert other == [vocab, pieces]
    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        assert [vocab[s] for s in specials] == list(range(5))
        assert sum(t.startswith("##") for t in vocab) > 100  # continuation pieces were learned
        # WordPiece pieces: a word is a first piece then "##" pieces, which spell it
        for word in pieces[:2]:
            assert not word[0].startswith("##") and all(p.startswith("##") for p in word[1:])
        assert ["".join(p.removeprefix("##") for p in word) for word in pieces[:2]] == ["ExtendedContext", "getcontext"]
        assert "[UNK]" not in sum(pieces, [])
