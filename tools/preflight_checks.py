"""The checks of tools/preflight.py: a go/no-go before paying for 8xH100 time.

Each check returns `Check` rows: ok=True (go), False (no-go) or None (information). On a GPU machine everything is
real: versions, GPUs, disk and memory, the dataset, the time plan, and three training steps, one calibration batch
and an artifact write/reload at full size with the peak memory. On a CPU machine the CUDA-only contracts are
emulated (tools/cuda_emulation.py) at the record's full size: the forward and backward through the strict
FlashAttention-3 stand-in under CUDA's autocast policy in the bf16 precision policy, the parameter count, and the
projected artifact size; the real-steps check runs only for models small enough for a CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import train_gpt
from data import shards
from train_gpt import Config

GPUS_EXPECTED = 8
CPU_REAL_STEPS_MAX_PARAMS = 5_000_000  # above this, real steps on a CPU take minutes: the GPU does them
EMULATED_SEQ_LEN = 512  # full-size model, shorter sequence: the per-token shapes and dtypes are the record's


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # True go, False no-go, None information
    detail: str


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions(rt: train_gpt.Runtime) -> list[Check]:
    cuda = torch.version.cuda or "none (CPU build)"
    rows = [Check("python", None, platform.python_version()), Check("torch", None, f"{torch.__version__} (CUDA {cuda})"),
            Check("triton", None, _version("triton")), Check("flash_attn_3", None, _version("flash_attn_3"))]
    if rt.device.type == "cuda":
        rows.append(Check("nccl", None, ".".join(map(str, torch.cuda.nccl.version()))))
        rows.append(Check("attention", rt.fa3 is not None, f"{rt.attention} ({rt.attention_note}); the record runs "
                          "FlashAttention-3: install it from requirements-gpu.txt"))
    else:
        rows.append(Check("attention", None, f"{rt.attention} ({rt.attention_note}); FA3's contract is emulated below"))
    return rows


def gpus() -> list[Check]:
    n = torch.cuda.device_count()
    names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
    sxm = all("H100" in name and "PCIe" not in name for name in names)
    return [Check("gpu count", n == GPUS_EXPECTED, f"{n} visible (the record runs on {GPUS_EXPECTED})"),
            Check("gpu model", sxm, f"{', '.join(names)} (H100 SXM required; PCIe parts are slower and not the rules)")]


def resources(paths: list[Path], need_disk_gb: float, required: bool) -> list[Check]:
    """Free disk where data and outputs go, and host memory; no-go only where the run happens (required)."""
    rows = []
    for path in paths:
        probe = next((p for p in [path, *path.parents] if p.exists()), Path("/"))
        free = shutil.disk_usage(probe).free / 1e9
        ok = free >= need_disk_gb
        rows.append(Check(f"disk {path}", ok if required or ok else None, f"{free:.1f} GB free (need {need_disk_gb:g} GB)"))
    try:
        mem = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        avail = int(mem["MemAvailable"].split()[0]) / 2**20
        rows.append(Check("host memory", avail >= 16, f"{avail:.1f} GiB available"))
    except (OSError, KeyError, ValueError):
        rows.append(Check("host memory", None, "unknown (no /proc/meminfo)"))
    return rows


def data(cfg: Config, required: bool) -> tuple[list[Check], shards.Data | None]:
    """Every shard's header and size, the tokenizer against VOCAB_SIZE and the dataset manifest's hash."""
    try:
        loaded = shards.load_data(cfg.dataset_dir, cfg.tokenizer_file, cfg.vocab_size, cfg.eval_seq_len)
        tokens = sum(shards.read_shard_header(f) for f in loaded.train_files)
    except (OSError, ValueError) as e:
        return [Check("dataset", False if required else None, f"{e}".splitlines()[0])], None
    return [Check("dataset", True, f"{len(loaded.train_files)} train shards verified ({tokens / 1e9:.2f}B tokens), "
                  f"{loaded.val_tokens.numel() - 1:,} val tokens, tokenizer sha256 {loaded.tokenizer_sha256[:12]}")], loaded


def plan(cfg: Config, code_bytes: int) -> list[Check]:
    """Steps in the train budget, eval seconds and artifact bytes, from the roofline planner (tools/estimate.py)."""
    from tools import artifact_size, planner
    k = planner.default_constants()
    prof = planner.custom_profile(cfg)
    train, ev = planner.train_plan(prof, k), planner.eval_plan(prof, k)
    size = round(artifact_size.predict_bytes(cfg, code_bytes)["total_bytes"])
    limit = train_gpt.TIME_LIMIT_SECONDS
    return [Check("plan: train", None, f"~{train['steps']:,.0f} steps in {limit:g} s on 8xH100 "
                  f"({1000 * train['step_s_pre']:.0f} ms/step)"),
            Check("plan: eval", ev["total_s"] <= limit, f"~{ev['total_s']:.0f} s of {limit:g} s"),
            Check("plan: artifact", size <= train_gpt.ARTIFACT_LIMIT_BYTES,
                  f"~{size:,} bytes projected of {train_gpt.ARTIFACT_LIMIT_BYTES:,}")]


def _fast_model(cfg: Config, fa3: object) -> train_gpt.GPT:
    """The full-size model without its slow orthogonal init (shapes and dtypes are what is checked)."""
    with torch.device("meta"):
        model = train_gpt.GPT(cfg, fa3)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def emulated_model(cfg: Config) -> list[Check]:
    """CPU: forward and backward of the full-size model in the bf16 policy, through the strict FA3 stand-in under
    CUDA's autocast policy; dtypes at FA3 and on the residual stream, parameter count, finite loss and grads."""
    from tools.cuda_emulation import FA3ContractError, cuda_autocast_policy, strict_fa3
    t = time.perf_counter()
    with strict_fa3() as fa3, cuda_autocast_policy():
        fn, _ = train_gpt.resolve_attention("fa3", torch.device("cpu"))
        model = train_gpt.apply_precision(_fast_model(cfg, fn), "bf16")
        model.looping = cfg.num_loops > 0
        streams: set[torch.dtype] = set()
        model.blocks[0].register_forward_hook(lambda m, i, o: streams.add(o[0].dtype))
        ids = torch.randint(0, cfg.vocab_size, (1, min(EMULATED_SEQ_LEN, cfg.train_seq_len)))
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(ids, ids)
            loss.backward()
        except FA3ContractError as e:
            return [Check("emulated CUDA forward", False, f"FlashAttention-3 would reject the inputs: {e}")]
    params = sum(p.numel() for p in model.parameters())
    grads_ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    return [Check("parameters", None, f"{params:,}"),
            Check("emulated CUDA forward", bool(torch.isfinite(loss)) and grads_ok and streams == {torch.bfloat16},
                  f"bf16 policy, strict FA3 ({sum(fa3.calls.values())} calls), CUDA autocast policy: loss "
                  f"{loss.item():.3f}, residual stream {sorted(map(str, streams))}, grads finite: {grads_ok} "
                  f"({time.perf_counter() - t:.0f} s)")]


def real_steps(cfg: Config, rt: train_gpt.Runtime, steps: int = 3) -> list[Check]:
    """Three training steps at the config's size on this device (one rank's micro-batch), one calibration batch,
    an artifact written and reloaded, and the peak memory."""
    if rt.device.type == "cpu":
        with torch.device("meta"):
            params = sum(p.numel() for p in train_gpt.GPT(cfg).parameters())
        if params > CPU_REAL_STEPS_MAX_PARAMS:
            return [Check("real steps", None, f"{params:,} parameters: real steps at full size need the GPU machine")]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(cfg, out_dir=tmp, gptq_calibration_batches=1, warmup_steps=0)  # keeps cfg's class
        t = time.perf_counter()
        try:
            run = train_gpt.Run(cfg, rt)
            run.train_model = run.compile(run.model)
            opts = train_gpt.Optimizers(run.model, cfg, rt.rank, rt.world_size, rt.ns_dtype)
            loader = run.make_loader()
            for _ in range(steps):
                batches = [tuple(x.to(rt.device) for x in loader.next_batch(run.micro_seqs)) for _ in range(run.accum)]
                loss = train_gpt.train_step(run.train_model, opts, batches, cfg.grad_clip_norm, rt.amp)
            step_s = (time.perf_counter() - t) / steps
            hessians = run.calibrate(seconds=float("inf"))
            n = run.serialize(hessians, Path(tmp) / "artifact.ptz")
            train_gpt.load_quantized_model(Path(tmp) / "artifact.ptz", cfg, rt.device, rt.precision, rt.fa3)
        except (RuntimeError, ValueError, OSError) as e:
            return [Check("real steps", False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")]
    rows = [Check("real steps", bool(torch.isfinite(loss)), f"{steps} steps, loss {loss.item():.3f}, "
                  f"{step_s:.2f} s/step (eager, first steps); {len(hessians)} Hessians; artifact {n:,} bytes "
                  f"written and reloaded")]
    if rt.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        total = torch.cuda.get_device_properties(rt.device).total_memory / 2**30
        rows.append(Check("peak memory", peak < 0.95 * total, f"{peak:.1f} GiB of {total:.0f} GiB"))
    return rows


def verdict(rows: list[Check]) -> tuple[bool, str]:
    bad = [r for r in rows if r.ok is False]
    if bad:
        return False, f"preflight: NO-GO ({len(bad)} failed: {', '.join(r.name for r in bad)})"
    return True, f"preflight: GO ({sum(r.ok is True for r in rows)} checks passed, {sum(r.ok is None for r in rows)} info)"


def default_paths(cfg: Config) -> list[Path]:
    return sorted({Path(cfg.data_dir).resolve(), Path(cfg.out_dir).resolve()}, key=str)


