"""The tiny CPU run of a record's script, inside the sandbox (docs/rules.md "The sandbox run").

build_record runs the packed file this way before writing a folder (after the static scan), and check_record runs a
folder's script this way to observe what it does. The config is every stage but sliding/TTT at toy size, GPTQ on
real Hessians, a few seconds on one core; the data is a few thousand tokens cut from the builtin dataset (or
tokenized on the spot from CPython's pydoc topics, no network).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from tools.log_parser import parse_log
from tools.record_pack import RecordError
from tools.safe_io import read_log
from tools.sandbox import Observation, base_env, run_sandboxed

ROOT = Path(__file__).resolve().parent.parent
SMOKE_ENV = dict(NUM_LAYERS="2", MODEL_DIM="64", NUM_HEADS="2", NUM_KV_HEADS="1", ROPE_DIMS="8", MLP_MULT="2",
                 LOOP_START="0", LOOP_END="0", NUM_LOOPS="1", PARALLEL_RESIDUAL_START="1", XSA_LAST_N="2",
                 TRAIN_SEQ_LEN="64", TRAIN_BATCH_TOKENS="512", GRAD_ACCUM_STEPS="1", ITERATIONS="3",
                 WARMUP_STEPS="1", MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", TRAIN_LOG_EVERY="1",
                 VAL_BATCH_TOKENS="4096", EVAL_SEQ_LEN="64", EVAL_STRIDE="32",
                 SLIDING_WINDOW_ENABLED="0", TTT_ENABLED="0", GPTQ_CALIBRATION_BATCHES="2",
                 PASSTHROUGH_NUMEL="1024", COMPILE="0")
SMOKE_TRAIN_TOKENS, SMOKE_VAL_TOKENS = 32_768, 4_097
SMOKE_TIMEOUT_S = 600


def smoke_dataset(work: Path) -> tuple[Path, Path, int]:
    """(dataset dir, tokenizer, vocab) with small train/val shards: cut from the builtin dataset when built
    (python data/builtin_corpus.py), else tokenized here from CPython's pydoc topics (no network)."""
    import numpy as np
    import sentencepiece as spm

    from data.shards import TRAIN_GLOB, VAL_GLOB, load_shard, write_shard
    builtin, tok = ROOT / "data/datasets/builtin_sp1024", ROOT / "data/tokenizers/builtin_1024_bpe.model"
    out = work / "smoke_data"
    out.mkdir(parents=True)
    if not (tok.is_file() and list(builtin.glob(VAL_GLOB)) and list(builtin.glob("fineweb_train_*.bin"))):
        from data import builtin_corpus, tokenize_docs
        docs = builtin_corpus.pydoc_docs()
        docs_path = work / "docs.jsonl"
        docs_path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        tokenize_docs.build_dataset(docs_path, 512, 20, work / "pydoc_sp512", work / "pydoc_512_bpe")
        builtin, tok = work / "pydoc_sp512", work / "pydoc_512_bpe.model"
    shutil.copy(tok, out / tok.name)  # beside the shards, under `work`: the sandbox sees nothing else of a /tmp checkout
    tok = out / tok.name
    for split, pattern, n in (("train", TRAIN_GLOB, SMOKE_TRAIN_TOKENS),
                              ("val", VAL_GLOB, SMOKE_VAL_TOKENS)):
        tokens = np.concatenate([load_shard(p) for p in sorted(builtin.glob(pattern))])
        write_shard(out / f"fineweb_{split}_000000.bin", tokens[:n])
    return out, tok, spm.SentencePieceProcessor(model_file=str(tok)).vocab_size()


def smoke_observe(files: dict[str, bytes], work: Path, timeout: float = SMOKE_TIMEOUT_S,
                  script: str = "train_gpt.py", python: str | None = None,
                  extra_env: dict[str, str] | None = None) -> Observation:
    """Run `script` among `files` on the tiny config in the sandbox (under `python`, default this interpreter); the
    run directory is kept under `work`. `extra_env`: an experiment's own settings (its added Config fields)."""
    data, tok, vocab = smoke_dataset(work)
    env = base_env({**SMOKE_ENV, **(extra_env or {}), "DATA_PATH": str(data), "TOKENIZER_PATH": str(tok),
                    "VOCAB_SIZE": str(vocab), "OUT_DIR": "out", "RUN_ID": "smoke"})
    return run_sandboxed(files, env, timeout, script=script, extra_roots=[str(work)], work=work / "sandbox", keep=True,
                         python=python)


@dataclass(frozen=True)
class SmokeResult:
    seconds: float
    bytes_code: int
    bytes_model: int
    val_bpb: float
    observation: Observation


def smoke_run(packed: str, work: Path, fields: set[str], extra_env: dict[str, str] | None = None,
              expect_fields: tuple[str, ...] = ()) -> SmokeResult:
    """Run the packed file alone on the tiny config in the sandbox; it must finish, write an artifact, log exactly
    itself as the code that ran, and neither reach the network nor start other programs. A packed experiment gets
    `extra_env` (its own settings) and must log `expect_fields` (its added Config fields) among its Hyperparameters:
    proof that the entry script ran, not train_gpt.py alone."""
    unknown = sorted(k for k in SMOKE_ENV if k.lower() not in fields)
    if unknown:
        raise RecordError(f"smoke config keys {unknown} are not Config fields of this train_gpt.py; update SMOKE_ENV")
    obs = smoke_observe({"train_gpt.py": packed.encode("utf-8")}, work, extra_env=extra_env)
    if not obs.ran:
        raise RecordError(f"cannot run the smoke test: {obs.reason} (the packed file is never run unsandboxed)")
    if obs.timed_out:
        raise RecordError(f"smoke run of the packed train_gpt.py did not finish in {SMOKE_TIMEOUT_S} s")
    if obs.returncode != 0:
        tail = "\n".join((obs.stderr_tail or obs.stdout_tail).strip().splitlines()[-15:])
        raise RecordError(f"smoke run of the packed train_gpt.py failed (exit {obs.returncode}):\n{tail}")
    bad = obs.network + [d for exe, d in obs.processes if exe != "nvidia-smi"] + obs.native + obs.unpickled
    if bad:
        raise RecordError(f"smoke run of the packed train_gpt.py did what records may not: {bad[0]}")
    run_dir = obs.workdir / "record"
    artifact, log = run_dir / "out/final_model.int6.ptz", run_dir / "out/logs/smoke.txt"
    if not artifact.is_file() or not log.is_file():
        raise RecordError("smoke run of the packed train_gpt.py exited 0 but wrote no artifact or no log")
    parsed = parse_log(read_log(log))
    size = len(packed.encode("utf-8"))
    if parsed["bytes_code"] != size or parsed["sources"] != {"train_gpt.py": packed}:
        raise RecordError(f"smoke run logged bytes_code:{parsed['bytes_code']} and sources {sorted(parsed['sources'])}; "
                          f"expected the packed file alone ({size} bytes)")
    if missing := [k for k in expect_fields if k not in parsed["hyperparameters"]]:
        raise RecordError(f"smoke run of the packed train_gpt.py logged no {', '.join(missing)} among its "
                          f"Hyperparameters: the experiment's Config did not run")
    if parsed["final_val_bpb"] is None or not math.isfinite(parsed["final_val_bpb"]):
        raise RecordError("smoke run of the packed train_gpt.py logged no finite final val_bpb")
    return SmokeResult(obs.seconds, size, artifact.stat().st_size, parsed["final_val_bpb"], obs)
