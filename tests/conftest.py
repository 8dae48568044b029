"""Shared fixtures. Puts the repo root on sys.path so tests import train_gpt, data.* and tools.* like the scripts do."""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY_VOCAB = 512
TINY_VAL_BYTES = 60_000  # val = the most leading docs within this many raw bytes (~10%, ~20k+ tokens)


@dataclass(frozen=True)
class TinyDataset:
    data_dir: Path  # fineweb_{train,val}_*.bin + manifest.json
    tokenizer: Path  # SentencePiece .model
    vocab_size: int


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> TinyDataset:
    """A small real-prose dataset (CPython's pydoc topics, no network), built once per session with the same
    code path as the builtin corpus: vocab 512, ~90% of the text train, val ~30k tokens."""
    from data import builtin_corpus, tokenize_docs

    root = tmp_path_factory.mktemp("tiny_dataset")
    docs = builtin_corpus.pydoc_docs()
    random.Random(builtin_corpus.SHUFFLE_SEED).shuffle(docs)
    sizes = [len(d.encode("utf-8")) for d in docs]
    num_val = max(1, sum(1 for i in range(len(docs)) if sum(sizes[:i + 1]) <= TINY_VAL_BYTES))
    docs_path = root / "docs.jsonl"
    docs_path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    manifest = tokenize_docs.build_dataset(docs_path, TINY_VOCAB, num_val, root / "tiny_sp512",
                                           root / "tiny_512_bpe")
    assert manifest["vocab_size"] == TINY_VOCAB, manifest["vocab_size"]
    return TinyDataset(data_dir=root / "tiny_sp512", tokenizer=root / "tiny_512_bpe.model", vocab_size=TINY_VOCAB)
