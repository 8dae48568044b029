"""train_gpt training machinery: budget and import hygiene, Config, schedules, compile warm-up reset, the shuffled
loader, a golden CPU loss trace, and a wallclock-capped in-process run."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, TINY_TRAIN

import train_gpt
from data import shards
from data.shards import ShardError, ShuffledSequenceLoader, write_shard
from train_gpt import (
    GPT,
    Config,
    Optimizers,
    Schedule,
    train_step,
)

ROOT = Path(__file__).resolve().parent.parent
TRAIN_GPT = ROOT / "train_gpt.py"
GOLDEN = Path(__file__).resolve().parent / "assets" / "golden_losses_cpu.txt"
TINY = TINY_MODEL


# --- budget and import hygiene ---------------------------------------------------------------------------------------

def test_train_gpt_line_budget() -> None:
    n = len(TRAIN_GPT.read_text(encoding="utf-8").splitlines())
    assert n <= 1500, f"train_gpt.py has {n} lines; the budget is 1,500 (upstream's baseline rule): something must leave"


IMPORT_PROBE = textwrap.dedent("""
    import collections.abc, json, os, random, sys
    import numpy as np, torch, torch.distributed as dist, torch.nn.functional  # train_gpt's own dependencies
    for name in ("brotli", "zstandard", "lzma", "sentencepiece"):  # quant's, once it is inlined
        try:
            __import__(name)
        except ImportError:
            pass

    def torch_state():
        return dict(threads=torch.get_num_threads(), interop=torch.get_num_interop_threads(),
                    dtype=str(torch.get_default_dtype()), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32, precision=torch.get_float32_matmul_precision(),
                    deterministic=torch.are_deterministic_algorithms_enabled(), grad=torch.is_grad_enabled(),
                    torch_rng=torch.get_rng_state().tolist(), np_rng=np.random.get_state()[1].tolist(),
                    py_rng=repr(random.getstate()), dist=dist.is_initialized())

    class EnvSpy(collections.abc.MutableMapping):  # records every key the import reads from os.environ
        def __init__(self, env):
            self.env, self.reads = env, []
        def __getitem__(self, key):
            self.reads.append(key)
            return self.env[key]
        def __setitem__(self, key, value):
            self.reads.append(key)
            self.env[key] = value
        def __delitem__(self, key):
            self.reads.append(key)
            del self.env[key]
        def __iter__(self):
            self.reads.append("<iter>")
            return iter(self.env)
        def __len__(self):
            return len(self.env)
        def copy(self):
            self.reads.append("<copy>")
            return self.env.copy()

    before = torch_state()
    spy, real_env = EnvSpy(os.environ), os.environ
    os.environ = spy
    try:
        import train_gpt
    finally:
        os.environ = real_env
    after = torch_state()
    try:
        train_gpt.Config.from_env()
        from_env = "no error"
    except ValueError as e:
        from_env = str(e)
    print(json.dumps(dict(changed=sorted(k for k in before if before[k] != after[k]), env_reads=spy.reads,
                          cwd_files=os.listdir("."), from_env=from_env)))
""")


def test_import_has_no_side_effects(tmp_path: Path) -> None:
    cwd = tmp_path / "empty"
    cwd.mkdir()
    env = {**os.environ, "MODEL_DIMS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["changed"] == [], f"import changed torch/numpy/random/dist state: {report['changed']}"
    assert report["env_reads"] == [], f"import read env vars: {report['env_reads']}"
    assert report["cwd_files"] == [] and not any(cwd.iterdir()), report["cwd_files"]
    assert report["from_env"] == "unknown config env var MODEL_DIMS; did you mean MODEL_DIM?"  # only from_env looks


# --- Config ----------------------------------------------------------------------------------------------------------

CONFIG_FIELDS = {  # adding a knob is a deliberate two-line edit: the field and this set
    "adam_eps", "adam_wd", "attention", "beta1", "beta2", "compile", "compressor", "data_dir", "data_path", "ema_decay",
    "embed_bits", "embed_clip_sigmas", "embed_wd", "enable_looping_at", "eval_seq_len", "eval_stride",
    "gptq_calibration_batches", "gptq_reserve_seconds", "grad_accum_steps", "grad_clip_norm", "iterations",
    "ln_scale", "logit_softcap", "loop_end", "loop_start", "matrix_bits", "matrix_lr", "attn_clip_sigmas",
    "mlp_clip_sigmas", "lqer_enabled", "lqer_rank", "lqer_top_k", "lqer_asym_group",
    "max_wallclock_seconds", "min_lr", "mlp_leaky_slope", "mlp_mult", "model_dim", "muon_backend_steps",
    "muon_momentum", "muon_momentum_warmup_start", "muon_momentum_warmup_steps", "muon_row_normalize", "muon_wd",
    "num_heads", "num_kv_heads", "num_layers", "num_loops", "out_dir", "parallel_residual_start", "passthrough_numel",
    "precision", "qk_gain_init", "parallel_lanes", "smear_gate_enabled", "sparse_attn_gate_enabled",
    "sparse_attn_gate_scale", "doc_isolation", "train_loader", "muon_ns",
    "rope_base", "rope_dims", "run_id", "scalar_lr", "seed", "skip_gates_enabled", "sliding_window_enabled",
    "tied_embed_init_std", "tied_embed_lr", "tokenizer_path", "train_batch_tokens", "train_log_every",
    "train_seq_len", "ttt_enabled", "ttt_lora_rank", "ttt_lora_alpha", "ttt_lora_lr", "ttt_beta1", "ttt_beta2",
    "ttt_weight_decay", "ttt_chunk_size", "ttt_eval_seq_len", "ttt_batch_size", "ttt_lanes", "phased_ttt_prefix_docs",
    "phased_ttt_num_phases", "global_ttt_lr", "global_ttt_momentum", "global_ttt_chunk_tokens", "val_batch_tokens",
    "val_loss_every", "vocab_size", "warmdown_frac", "warmup_steps", "xsa_last_n",
}


def test_config_field_set_is_frozen() -> None:
    assert {f.name for f in dataclasses.fields(Config)} == CONFIG_FIELDS
    assert all(f.type in ("int", "float", "bool", "str") for f in dataclasses.fields(Config))  # from_env parses these
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().seed = 1  # type: ignore[misc]


def test_from_env_parses_by_field_type() -> None:
    cfg = Config.from_env({"NUM_LAYERS": "7", "MLP_MULT": "3", "MATRIX_LR": "0.5", "MIN_LR": "1e-2",
                           "LN_SCALE": "0", "SKIP_GATES_ENABLED": "false", "TTT_ENABLED": "True",
                           "MUON_ROW_NORMALIZE": "1", "COMPRESSOR": "zstd", "RUN_ID": "abc 1"})
    assert (cfg.num_layers, cfg.mlp_mult, cfg.matrix_lr, cfg.min_lr) == (7, 3.0, 0.5, 0.01)
    assert type(cfg.num_layers) is int and type(cfg.mlp_mult) is float
    assert (cfg.ln_scale, cfg.skip_gates_enabled, cfg.ttt_enabled, cfg.muon_row_normalize) == (False, False, True, True)
    assert (cfg.compressor, cfg.run_id) == ("zstd", "abc 1")
    assert Config.from_env({}) == Config()  # no env, the record's defaults


@pytest.mark.parametrize("key, raw, typ", [("NUM_LAYERS", "1.5", "int"), ("SEED", "", "int"),
                                           ("MATRIX_LR", "fast", "float"), ("LN_SCALE", "yes", "bool"),
                                           ("TTT_ENABLED", "2", "bool")])
def test_from_env_bad_value_is_a_clear_error(key: str, raw: str, typ: str) -> None:
    with pytest.raises(ValueError) as err:
        Config.from_env({key: raw})
    assert str(err.value) == f"{key}={raw!r} is not a valid {typ}"
    assert err.value.__cause__ is None and err.value.__suppress_context__  # one line, no chained traceback


@pytest.mark.parametrize("typo, field", [("MODEL_DIMS", "MODEL_DIM"), ("NUM_LAYER", "NUM_LAYERS"),
                                         ("TTT_LORA_RANKS", "TTT_LORA_RANK"), ("WARMDOWN_FRACS", "WARMDOWN_FRAC"),
                                         ("PARALLEL_START_LAYERS", "PARALLEL_START_LAYER"),  # upstream names too
                                         ("FUSED_CE_ENABLE", "FUSED_CE_ENABLED")])
def test_from_env_near_miss_suggests_the_field(typo: str, field: str) -> None:
    with pytest.raises(ValueError, match=f"unknown config env var {typo}; did you mean {field}\\?"):
        Config.from_env({typo: "1"})


def test_from_env_ignores_unrelated_env_vars() -> None:
    torchrun = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
                "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
                "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS"]
    others = ["PATH", "HOME", "USER", "SHELL", "LANG", "PWD", "PYTHONPATH", "CUDA_VISIBLE_DEVICES", "NCCL_DEBUG",
              "HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "PYTEST_CURRENT_TEST", "model_dims"]
    assert Config.from_env({k: "1" for k in torchrun + others}) == Config()
    fields = {name.upper() for name in CONFIG_FIELDS}
    assert Config.from_env({k: v for k, v in os.environ.items() if k not in fields}) == Config()


@pytest.mark.parametrize("kwargs, msg", [
    (dict(model_dim=100, num_heads=3), "MODEL_DIM=100 not divisible by NUM_HEADS=3"),
    (dict(num_heads=8, num_kv_heads=3), "not a multiple of NUM_KV_HEADS"),
    (dict(eval_seq_len=2048, eval_stride=100), "EVAL_STRIDE must divide EVAL_SEQ_LEN"),
    (dict(rope_dims=80), "ROPE_DIMS=80 must be even"),
    (dict(num_layers=4, loop_start=3, loop_end=5), "loop span 3..5 outside 4 layers"),
    (dict(train_seq_len=1000), "TRAIN_BATCH_TOKENS must be a multiple of TRAIN_SEQ_LEN"),
    (dict(compressor="gzip"), "COMPRESSOR='gzip'"),
    (dict(ttt_chunk_size=4096), "TTT_CHUNK_SIZE must be in 1..TTT_EVAL_SEQ_LEN"),
    (dict(global_ttt_chunk_tokens=1000), "GLOBAL_TTT_CHUNK_TOKENS must be a multiple of EVAL_SEQ_LEN"),
])
def test_invalid_combinations_raise(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=re.escape(msg)):
        Config(**kwargs)
    env = {k.upper(): str(v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=re.escape(msg)):
        Config.from_env(env)


# --- schedules -------------------------------------------------------------------------------------------------------

def test_lr_multiplier_flat_then_linear_warmdown() -> None:
    lr_mul = Schedule(Config(warmdown_frac=0.72, min_lr=0.0)).lr_mul
    assert lr_mul(0.0) == 1.0
    assert lr_mul(0.27) == 1.0
    assert lr_mul(0.28) == pytest.approx(1.0)  # warmdown starts at 1 - 0.72: continuous
    assert lr_mul(0.64) == pytest.approx(0.5)
    assert lr_mul(1.0) == 0.0
    floored = Schedule(Config(warmdown_frac=0.72, min_lr=0.1)).lr_mul
    assert floored(0.9) == pytest.approx(0.1 / 0.72)
    assert floored(0.95) == 0.1 and floored(1.0) == 0.1  # MIN_LR floor
    values = [lr_mul(i / 1000) for i in range(1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # non-increasing


def test_muon_momentum_warmup() -> None:
    momentum = Schedule(Config(muon_momentum_warmup_start=0.92, muon_momentum=0.99)).muon_momentum
    assert momentum(0) == 0.92
    assert momentum(750) == pytest.approx(0.955)
    assert momentum(1500) == pytest.approx(0.99)
    assert momentum(4000) == pytest.approx(0.99)
    assert Schedule(Config(muon_momentum_warmup_steps=0)).muon_momentum(0) == 0.97  # no warmup: record N's 0.97


def test_schedule_as_data() -> None:
    """Record P's numbers: 600 s - 12 s reserve = 588,000 ms (record N: 8 s, 592,000 ms); progress from time; looping
    from 35% on, never off; calibration gets what the loop left."""
    s = Schedule(Config(gptq_reserve_seconds=12.0))
    assert s.cap_ms == 588_000.0 and Schedule(Config()).cap_ms == 592_000.0
    assert s.frac(10, 294_000.0) == 0.5
    assert [s.looping(f) for f in (0.0, 0.3499, 0.35, 0.99)] == [False, False, True, True]
    assert not Schedule(Config(num_loops=0)).looping(0.9)
    assert s.calibration_seconds(588_047.0) == pytest.approx(11.953)
    uncapped = Schedule(Config(max_wallclock_seconds=0, iterations=200))
    assert uncapped.cap_ms == 0 and uncapped.frac(50, 1e9) == 0.25 and uncapped.calibration_seconds(1e9) == math.inf


def test_optimizers_set_schedule_scales_every_group() -> None:
    cfg = Config(**TINY)
    opts = Optimizers(GPT(cfg), cfg)
    opts.set_schedule(0.5, 0.93)
    lrs = [g["lr"] for opt in opts.all for g in opt.param_groups]
    assert lrs == [0.5 * cfg.matrix_lr, 0.5 * cfg.tied_embed_lr, 0.5 * cfg.scalar_lr]
    assert [g["momentum"] for g in opts.muon.param_groups] == [0.93]


# --- compile warm-up reset -------------------------------------------------------------------------------------------

def train_files(data_dir: Path) -> list[str]:
    return shards.shard_files(str(data_dir / "fineweb_train_*.bin"))


def test_compile_warmup_restores_initial_state(tiny_dataset) -> None:
    cfg = Config(**TINY, warmup_steps=3)
    torch.manual_seed(0)
    model = GPT(cfg)
    opts = Optimizers(model, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts_before = opts.state_dict()
    seen: list[tuple[bool, float]] = []

    def step_fn(loader: ShuffledSequenceLoader) -> torch.Tensor:
        loss = train_step(model, opts, [loader.next_batch(4)], cfg.grad_clip_norm, contextlib.nullcontext)
        moved = max((p - before[n]).abs().max().item() for n, p in model.named_parameters())
        seen.append((model.looping, moved))
        return loss

    def make_loader() -> ShuffledSequenceLoader:
        return ShuffledSequenceLoader(train_files(tiny_dataset.data_dir), cfg.train_seq_len, cfg.vocab_size, cfg.seed)

    lines: list[str] = []
    train_gpt.compile_warmup(model, opts, step_fn, make_loader, cfg, lines.append)

    assert [looping for looping, _ in seen] == [False] * 3 + [True] * 3  # WARMUP_STEPS unlooped, then looped
    assert all(moved > 1e-4 for _, moved in seen)  # the warm-up steps really changed the weights
    assert lines[:3] == ["warmup_step: 1/3", "warmup_step: 2/3", "warmup_step: 3/3"]
    assert lines[3] == "loop_warmup:enabled encoder:[0, 1, 2] decoder:[1, 2, 3]"
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k  # bit-identical
    assert model.looping is False
    assert opts.state_dict() == opts_before  # param groups (lr, momentum) and state both as before
    assert all(len(opt.state) == 0 for opt in opts.all)  # AdamW moments and Muon momentum buffers gone


def test_compile_warmup_is_a_no_op_without_steps() -> None:
    cfg = Config(**TINY, warmup_steps=0)
    model = GPT(cfg)

    def fail(*_: object) -> None:
        raise AssertionError("no step or loader expected with WARMUP_STEPS=0")

    train_gpt.compile_warmup(model, Optimizers(model, cfg), fail, fail, cfg, fail)


# --- loader ----------------------------------------------------------------------------------------------------------

def position_shards(tmp_path: Path) -> tuple[list[str], dict[int, int]]:
    """Two shards whose token values are distinct positions, so a window's first token names its start."""
    sizes, bases = (2000, 1537), (0, 30000)
    files = []
    for i, (n, base) in enumerate(zip(sizes, bases)):
        path = tmp_path / f"fineweb_train_{i:06d}.bin"
        write_shard(path, np.arange(base, base + n))
        files.append(str(path))
    return files, dict(zip(bases, sizes))


def epoch_rows(loader: ShuffledSequenceLoader) -> list[torch.Tensor]:
    """The rows a loader yields in its first epoch."""
    rows = []
    while True:
        x, y = loader.next_batch(1)
        if loader.epoch > 0:
            return rows
        assert torch.equal(y[0, :-1], x[0, 1:])  # y is x shifted by one
        assert torch.equal(y[0], x[0] + 1)  # ... and the next token of the shard
        rows.append(x[0])


def test_loader_ranks_are_disjoint_and_cover_the_epoch(tmp_path: Path) -> None:
    files, sizes = position_shards(tmp_path)
    L = 64
    starts = [[int(r[0]) for r in epoch_rows(ShuffledSequenceLoader(files, L, 65536, seed=7, rank=r, world_size=2))]
              for r in range(2)]
    assert len(starts[0]) == len(set(starts[0])) and len(starts[1]) == len(set(starts[1]))
    assert not set(starts[0]) & set(starts[1])  # no sequence shared by the ranks
    for base, n in sizes.items():
        mine = sorted(s - base for s in starts[0] + starts[1] if base <= s < base + n)
        phase = mine[0]
        assert 0 <= phase < L
        assert mine == [phase + k * L for k in range((n - 1 - phase) // L)]  # every full window of the shard
    assert abs(len(starts[0]) - len(starts[1])) <= len(sizes)  # an even split


def test_loader_order_follows_seed(tmp_path: Path) -> None:
    files, _ = position_shards(tmp_path)

    def first_starts(seed: int, rank: int = 0) -> list[int]:
        loader = ShuffledSequenceLoader(files, 64, 65536, seed=seed, rank=rank, world_size=2)
        return [int(x[0, 0]) for x, _ in (loader.next_batch(1) for _ in range(20))]

    def window_order(starts: list[int]) -> list[tuple[int, int]]:  # (shard, window index): blind to the phases
        return [(int(s >= 30000), (s % 30000) // 64) for s in starts]

    assert first_starts(1) == first_starts(1)  # reproducible
    assert window_order(first_starts(1)) != window_order(first_starts(2))  # SEED changes the order, not just phases
    assert first_starts(1, rank=0) != first_starts(1, rank=1)
    x, y = ShuffledSequenceLoader(files, 64, 65536, seed=1).next_batch(5)
    assert x.shape == y.shape == (5, 64) and x.dtype == y.dtype == torch.int64


def test_loader_rejects_corrupt_shards(tmp_path: Path) -> None:
    bad = tmp_path / "fineweb_train_000000.bin"
    write_shard(bad, np.full(1000, 600))  # token id 600 >= vocab 512
    loader = ShuffledSequenceLoader([str(bad)], 64, 512, seed=0)
    with pytest.raises(ShardError, match=re.escape(f"{bad}: token id 600 >= vocab size 512")):
        loader.next_batch(1)
    truncated = tmp_path / "fineweb_train_000001.bin"
    write_shard(truncated, np.arange(1000))
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(ShardError, match=re.escape(f"{truncated}: header says 1000 tokens")):
        ShuffledSequenceLoader([str(truncated)], 64, 65536, seed=0)


# --- golden loss trace -----------------------------------------------------------------------------------------------

GOLDEN_STEPS = 20
GOLDEN_HEADER = """\
# Golden CPU loss trace: the first {steps} train losses of tests/test_trainer.py::test_golden_loss_trace (the tiny
# config there, seed 1337, torch.set_num_threads(1), fp32 eager, the real ShuffledSequenceLoader + Optimizers +
# train_step on the tiny_dataset fixture), compared within 1e-4.
# Regenerate: PGOLF_REGEN_GOLDEN=1 python -m pytest tests/test_trainer.py -k golden
# A regeneration must come in its own commit whose message says why the numbers changed.
# dataset: {dataset}  torch: {torch}  python: {python}
# step loss
"""


def dataset_fingerprint(data_dir: Path) -> str:
    h = hashlib.sha256()
    for f in train_files(data_dir):
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def golden_trace(data_dir: Path) -> list[float]:
    """The trainer's step loop of run() without wallclock, eval or logging: schedule, looping switch, train_step."""
    cfg = Config(**TINY, train_batch_tokens=1024, grad_accum_steps=2, iterations=GOLDEN_STEPS, seed=1337)
    accum = train_gpt.grad_accum_steps(cfg, 1)  # 2 micro-batches of 8 sequences: accumulation is in the trace
    micro_seqs = cfg.train_batch_tokens // (accum * cfg.train_seq_len)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg)
    opts = Optimizers(model, cfg)
    loader = ShuffledSequenceLoader(train_files(data_dir), cfg.train_seq_len, cfg.vocab_size, cfg.seed)
    losses = []
    for step in range(cfg.iterations):
        frac = step / cfg.iterations
        if frac >= cfg.enable_looping_at:
            model.looping = True
        opts.set_schedule(Schedule(cfg).lr_mul(frac), Schedule(cfg).muon_momentum(step))
        batches = [loader.next_batch(micro_seqs) for _ in range(accum)]
        losses.append(train_step(model, opts, batches, cfg.grad_clip_norm, contextlib.nullcontext).item())
    return losses


def test_golden_loss_trace(tiny_dataset) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = golden_trace(tiny_dataset.data_dir)
    finally:
        torch.set_num_threads(threads)
    dataset = dataset_fingerprint(tiny_dataset.data_dir)
    if os.environ.get("PGOLF_REGEN_GOLDEN") == "1":
        text = GOLDEN_HEADER.format(steps=GOLDEN_STEPS, dataset=dataset, torch=torch.__version__,
                                    python=sys.version.split()[0])
        text += "".join(f"{i} {loss:.6f}\n" for i, loss in enumerate(losses, 1))
        tmp = GOLDEN.with_name(GOLDEN.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, GOLDEN)
        pytest.skip(f"regenerated {GOLDEN}; commit it with a message that says why")
    text = GOLDEN.read_text()
    recorded = re.search(r"^# dataset: (\w+)", text, re.M)
    assert recorded, f"{GOLDEN}: no '# dataset:' header line"
    if recorded[1] != dataset:  # the tiny corpus is this Python's pydoc topics: another Python, another corpus
        pytest.skip(f"tiny_dataset fingerprint {dataset} != golden's {recorded[1]} (different pydoc topics?): "
                    f"the trace is not comparable here")
    golden = [(int(s), float(v)) for s, v in (line.split() for line in text.splitlines() if not line.startswith("#"))]
    assert [s for s, _ in golden] == list(range(1, GOLDEN_STEPS + 1))
    diffs = [abs(a - b) for (_, a), b in zip(golden, losses)]
    assert max(diffs) <= 1e-4, "loss trace moved:\n" + "\n".join(
        f"{i}: golden {g:.6f} now {now:.6f}" for (i, g), now in zip(golden, losses))
    assert losses[-1] < losses[0] - 0.5  # it is a training trace, not noise


# --- wallclock-capped in-process run ---------------------------------------------------------------------------------

def framed_sources(raw: bytes) -> dict[str, bytes]:
    """The code files framed at the top of a run log ("source_file: NAME bytes:N" + N bytes + newline each),
    which must end with a line of 100 '='."""
    sources, pos = {}, 0
    while m := re.compile(rb"source_file: (\S+) bytes:(\d+)\n").match(raw, pos):
        end = m.end() + int(m[2])
        sources[m[1].decode()] = raw[m.end() : end]
        assert raw[end : end + 1] == b"\n", f"{m[1]!r}: frame not followed by a newline"
        pos = end + 1
    assert raw[pos:].startswith(b"=" * 100 + b"\n"), "the framed sources must be followed by a line of 100 '='"
    return sources


@pytest.mark.slow
def test_wallclock_capped_run(tiny_dataset, tmp_path: Path) -> None:
    cap_s, reserve_s = 4.0, 1.0
    cfg = Config(**TINY, data_path=str(tiny_dataset.data_dir), tokenizer_path=str(tiny_dataset.tokenizer),
                 out_dir=str(tmp_path), run_id="wallclock", iterations=100_000, max_wallclock_seconds=cap_s,
                 gptq_reserve_seconds=reserve_s, warmup_steps=2, val_loss_every=0, train_log_every=1,
                 train_batch_tokens=1024, grad_accum_steps=1, val_batch_tokens=16384, eval_stride=32,
                 gptq_calibration_batches=2, ttt_enabled=False, sliding_window_enabled=False,
                 passthrough_numel=4096)  # fc, mlp.proj (64x256) and tok_emb (512x64) go through GPTQ
    rt = train_gpt.Runtime()
    summary = train_gpt.run(cfg, rt)

    raw = (tmp_path / "logs" / "wallclock.txt").read_bytes()
    sources = framed_sources(raw)
    assert list(sources)[0] == "train_gpt.py"  # the log opens with the exact code that ran, file by file
    quant_files = [f"quant/{p.name}" for p in sorted((ROOT / "quant").glob("*.py")) if p.name != "__main__.py"]
    evals_files = [f"evals/{p.name}" for p in sorted((ROOT / "evals").glob("*.py"))]
    expected = ["train_gpt.py", "data/__init__.py", "data/shards.py", *evals_files, *quant_files]  # every file that runs
    assert sorted(sources) == sorted(expected)
    for name, body in sources.items():
        assert body == (ROOT / name).read_bytes(), name
    log = raw.decode("utf-8")
    cap_ms = 1000 * (cap_s - reserve_s)
    stop = re.search(r"^stopping_early: wallclock_cap train_time: (\d+)ms step: (\d+)/100000$", log, re.M)
    assert stop, "no stopping_early line"
    train_ms, steps = int(stop[1]), int(stop[2])
    assert steps == summary["steps"] and train_ms == summary["train_time_ms"]
    step_ms = train_ms / steps
    assert cap_ms <= train_ms < cap_ms + max(3 * step_ms, 500), (train_ms, steps)
    loop = re.search(r"^layer_loop:enabled step:(\d+) frac:([\d.]+) encoder:\[0, 1, 2\] decoder:\[1, 2, 3\]$", log, re.M)
    assert loop and float(loop[2]) >= 0.35 and 0 < int(loop[1]) < steps
    assert summary["layer_loop_step"] == int(loop[1])

    assert re.search(r"^GPTQ:collected 9 Hessians in ", log, re.M)  # fc and mlp.proj of the 4 layers, tok_emb
    evals = summary["evals"]
    assert abs(evals["quantized"]["val_bpb"] - evals["pre-quantization post-ema"]["val_bpb"]) < 0.05

    nums = {k: int(v) for k, v in re.findall(r"^(bytes_code|bytes_model|bytes_total):(\d+)$", log, re.M)}
    assert nums["bytes_total"] == nums["bytes_code"] + nums["bytes_model"]
    assert nums["bytes_code"] == sum((ROOT / name).stat().st_size for name in sources)
    assert nums["bytes_model"] == (tmp_path / "final_model.int6.ptz").stat().st_size
    written = json.loads((tmp_path / "run_summary.json").read_text())
    assert {k: written[k] for k in nums} == nums
    assert math.isfinite(written["final_val_bpb"]) and 0 < written["final_val_bpb"] < 10
    assert written["final_label"] == "quantized"


# Every env name record N's script reads (its Hyperparameters class and the LoRA class body), from the script itself.
RECORD_N_ENV_NAMES = """DATA_DIR SEED RUN_ID ITERATIONS WARMDOWN_FRAC WARMUP_STEPS TRAIN_BATCH_TOKENS FUSED_CE_ENABLED
TRAIN_SEQ_LEN TRAIN_LOG_EVERY MAX_WALLCLOCK_SECONDS VAL_BATCH_TOKENS EVAL_SEQ_LEN VAL_LOSS_EVERY VOCAB_SIZE NUM_LAYERS
XSA_LAST_N MODEL_DIM NUM_KV_HEADS NUM_HEADS MLP_MULT SKIP_GATES_ENABLED TIE_EMBEDDINGS LOGIT_SOFTCAP ROPE_BASE ROPE_DIMS
ROPE_YARN LN_SCALE QK_GAIN_INIT NUM_LOOPS LOOP_START LOOP_END ENABLE_LOOPING_AT PARALLEL_START_LAYER
PARALLEL_FINAL_LANE MIN_LR EMBED_LR TIED_EMBED_LR TIED_EMBED_INIT_STD MATRIX_LR SCALAR_LR MUON_MOMENTUM MUON_BACKEND_STEPS
MUON_MOMENTUM_WARMUP_START MUON_MOMENTUM_WARMUP_STEPS MUON_ROW_NORMALIZE BETA1 BETA2 ADAM_EPS GRAD_CLIP_NORM EVAL_STRIDE
ADAM_WD MUON_WD EMBED_WD EMA_DECAY TTT_ENABLED TTT_LORA_RANK TTT_LORA_LR TTT_CHUNK_SIZE TTT_EVAL_SEQ_LEN TTT_BATCH_SIZE
TTT_GRAD_STEPS TTT_WEIGHT_DECAY TTT_BETA1 TTT_BETA2 TTT_K_LORA TTT_MLP_LORA TTT_O_LORA TTT_OPTIMIZER TTT_EVAL_BATCHES
VAL_DOC_FRACTION COMPRESSOR GPTQ_CALIBRATION_BATCHES GPTQ_RESERVE_SECONDS PHASED_TTT_PREFIX_DOCS PHASED_TTT_NUM_PHASES
GLOBAL_TTT_LR GLOBAL_TTT_MOMENTUM GLOBAL_TTT_EPOCHS GLOBAL_TTT_CHUNK_TOKENS GLOBAL_TTT_BATCH_SEQS
GLOBAL_TTT_WARMUP_START_LR GLOBAL_TTT_WARMUP_CHUNKS GLOBAL_TTT_GRAD_CLIP GLOBAL_TTT_RESPECT_DOC_BOUNDARIES MATRIX_BITS
EMBED_BITS MATRIX_CLIP_SIGMAS EMBED_CLIP_SIGMAS MLP_CLIP_SIGMAS ATTN_CLIP_SIGMAS ATTN_OUT_GATE_ENABLED GATE_WINDOW
SMEAR_GATE_ENABLED GATED_ATTN_ENABLED GATED_ATTN_QUANT_GATE SPARSE_ATTN_GATE_ENABLED SPARSE_ATTN_GATE_INIT_STD
SPARSE_ATTN_GATE_SCALE LQER_ENABLED LQER_RANK LQER_TOP_K LQER_FACTOR_BITS LQER_ASYM_ENABLED LQER_ASYM_GROUP
CASEOPS_ENABLED DATA_PATH TOKENIZER_PATH ARTIFACT_DIR TTT_LORA_ALPHA TTT_WARM_START_A TTT_EVAL_ONLY PREQUANT_ONLY""".split()


def test_every_record_n_env_name_maps_to_a_field_or_fails_clearly() -> None:
    fields = {f.name.upper() for f in dataclasses.fields(Config)}
    known = fields | set(train_gpt.UPSTREAM_ALIASES) | set(train_gpt.UPSTREAM_FIXED) | set(train_gpt.UPSTREAM_REFUSED)
    assert sorted(set(RECORD_N_ENV_NAMES) - known) == []
    cfg = Config.from_env({"PARALLEL_START_LAYER": "9", "SPARSE_ATTN_GATE_SCALE": "0.5", "TIE_EMBEDDINGS": "1",
                           "PARALLEL_FINAL_LANE": "mean", "FUSED_CE_ENABLED": "0", "SPARSE_ATTN_GATE_INIT_STD": "0.0"})
    assert (cfg.parallel_residual_start, cfg.sparse_attn_gate_scale) == (9, 0.5)
    # record N's own values of its phased-TTT and LQER switches pgolf fixes are accepted (its record env, its defaults)
    assert Config.from_env({"TTT_GRAD_STEPS": "1", "TTT_OPTIMIZER": "adam", "TTT_EVAL_BATCHES": "", "TTT_K_LORA": "1",
                            "GLOBAL_TTT_GRAD_CLIP": "1.0", "GLOBAL_TTT_BATCH_SEQS": "32", "VAL_DOC_FRACTION": "1.0",
                            "GLOBAL_TTT_WARMUP_START_LR": "0.0", "TTT_WARM_START_A": "1", "PREQUANT_ONLY": "0",
                            "PHASED_TTT_NUM_PHASES": "3", "TTT_LORA_ALPHA": "144", "LQER_FACTOR_BITS": "4",
                            "LQER_ASYM_ENABLED": "1", "LQER_ENABLED": "1", "MLP_CLIP_SIGMAS": "12.0"}) == Config()
    for key, value, match in (("FUSED_CE_ENABLED", "1", "no fused Triton kernel"),
                              ("MATRIX_CLIP_SIGMAS", "11", "ATTN_CLIP_SIGMAS"), ("LQER_FACTOR_BITS", "2", "INT4"),
                              ("TTT_GRAD_STEPS", "2", "record N's setting"), ("EMBED_LR", "0.6", "TIED_EMBED_LR"),
                              ("PARALLEL_FINAL_LANE", "last", "their mean")):
        with pytest.raises(ValueError, match=f"^{key}={value}: .*{match}"):
            Config.from_env({key: value})


def test_train_loader_follows_config_and_calibration_reads_shuffled_windows(tiny_dataset, monkeypatch) -> None:
    from data.shards import DocumentPackingLoader
    base = dict(TINY, data_path=str(tiny_dataset.data_dir), tokenizer_path=str(tiny_dataset.tokenizer))
    packed = train_gpt.Run(Config(**base), train_gpt.Runtime())
    assert isinstance(packed.make_loader(), DocumentPackingLoader)  # record N's order is the default
    assert packed.make_loader().next_batch(2)[0][0, 0] == train_gpt.BOS_ID  # it starts at a document
    shuffled = train_gpt.Run(Config(**base, train_loader="shuffled"), train_gpt.Runtime())
    assert isinstance(shuffled.make_loader(), ShuffledSequenceLoader)
    kinds = []
    monkeypatch.setattr(packed, "make_loader", lambda kind=None: kinds.append(kind) or shuffled.make_loader())
    packed.calibrate(seconds=60.0)
    assert kinds == ["shuffled"]


def test_artifact_has_record_n_quantization(tiny_run) -> None:
    """The run's artifact: int7 embedding, int6 attention/MLP matrices, LQER corrections on the top 3 residuals (the
    trainer's defaults are record N's), and quant roles assigned to every block matrix by module, not by name rules."""
    from quant import load_artifact
    qts = {qt.name: qt for qt in load_artifact(tiny_run.out_dir / "final_model.int6.ptz")}
    assert qts["tok_emb.weight"].bits == 7
    assert {qt.bits for n, qt in qts.items() if n.startswith("blocks.") and qt.kind == "gptq"} == {6}
    assert sum(qt.lqer is not None for qt in qts.values()) == 3
    roles = train_gpt.quant_roles(GPT(Config(**TINY)))
    assert roles["blocks.0.attn.proj.weight"] == "attn" and roles["blocks.3.mlp.proj.weight"] == "mlp"
    assert set(roles.values()) == {"embed", "attn", "mlp"} and len(roles) == 1 + 6 * TINY["num_layers"]


def test_main_frees_the_run_before_process_group_teardown(tiny_dataset, tmp_path: Path, monkeypatch) -> None:
    """A finished run leaves reference cycles (a model, its DDP hooks and, through them, the process group's pending
    work) that only the cyclic GC frees; torn down at interpreter exit instead, gloo aborted a finished 2-rank run
    ("terminate called without an active exception"). main() collects them before destroy_process_group."""
    env = {k.upper(): str(v) for k, v in TINY_TRAIN.items()}
    env.update(ITERATIONS="2", TTT_ENABLED="0", SLIDING_WINDOW_ENABLED="0", DATA_PATH=str(tiny_dataset.data_dir),
               TOKENIZER_PATH=str(tiny_dataset.tokenizer), OUT_DIR=str(tmp_path), RUN_ID="teardown")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    done, alive = [], []
    real_run = train_gpt.run
    monkeypatch.setattr(train_gpt, "run", lambda cfg, rt: (real_run(cfg, rt), done.append(True))[0])
    monkeypatch.setattr(train_gpt, "dist_ready", lambda: bool(done))  # "distributed" once the run has returned
    monkeypatch.setattr(train_gpt.dist, "destroy_process_group",
                        lambda: alive.append(sum(issubclass(type(o), train_gpt.GPT) for o in gc.get_objects())))
    gc.collect()
    gc.disable()  # no automatic collection may do main()'s job
    try:
        train_gpt.main()
    finally:
        gc.enable()
    assert done and alive == [0], alive
