"""Shared fixtures. The project is installed (`pip install -e .`), so tests import train_gpt, quant, data.* and tools.*
like the scripts do."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> None:
    """Tiny CPU tensors run faster on one thread, and OpenMP's second thread stalls badly whenever the other core
    is busy (64x64 matmuls measured ~250x slower). One thread also keeps float results reproducible."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# THE tiny config of the test suite: every test builds its Config from TINY_MODEL (the record stack's shape at toy
# size, every feature on) or TINY_TRAIN (plus a seconds-long training run), with explicit overrides where it needs them.
TINY_MODEL = dict(
    vocab_size=TINY_VOCAB, num_layers=4, model_dim=64, num_heads=4, num_kv_heads=2, rope_dims=8, loop_start=1,
    loop_end=2, num_loops=1, parallel_residual_start=3, xsa_last_n=4, train_seq_len=64, eval_seq_len=64)
TINY_TRAIN = dict(
    **TINY_MODEL, train_batch_tokens=2048, grad_accum_steps=1, iterations=6, max_wallclock_seconds=0.0, warmup_steps=1,
    muon_momentum_warmup_steps=4, ema_decay=0.5, train_log_every=2, val_loss_every=0, val_batch_tokens=16384, eval_stride=32,
    ttt_lora_rank=4, ttt_chunk_size=16, ttt_eval_seq_len=64, ttt_batch_size=4, ttt_lanes=2, phased_ttt_prefix_docs=8,
    global_ttt_chunk_tokens=256, gptq_calibration_batches=2, passthrough_numel=1024, compressor="brotli")


@dataclass(frozen=True)
class TinyRun:
    out_dir: Path  # logs/<run_id>.txt, final_model.pt, final_model.int6.ptz, run_summary.json
    summary: dict
    log: Path


@pytest.fixture(scope="session")
def tiny_run(tiny_dataset: TinyDataset, tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    """One real in-process training run of the toy stack (train, GPTQ, artifact, reload, all evals)."""
    import train_gpt

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = train_gpt.Config(**TINY_TRAIN, data_path=str(tiny_dataset.data_dir), tokenizer_path=str(tiny_dataset.tokenizer),
                           out_dir=str(out), run_id="tiny", seed=7)
    rt = train_gpt.Runtime()  # one CPU process, fp32, SDPA
    summary = train_gpt.run(cfg, rt)
    return TinyRun(out_dir=out, summary=summary, log=out / "logs" / "tiny.txt")
