"""Go / no-go before paying for 8xH100 time, in under 2 minutes.

    python tools/preflight.py                              # the trainer's defaults (env vars override them)
    python tools/preflight.py --env-file configs/cpu_tiny.env

On a GPU machine: torch / CUDA / FlashAttention-3 / NCCL versions, GPU count and model, free disk and memory, every
dataset shard verified and the tokenizer checked against VOCAB_SIZE and the dataset's manifest, the time plan of
tools/estimate.py, then three real training steps, one calibration batch and an artifact write/reload at full
size with the peak memory. On a CPU machine the CUDA-only contracts are emulated at the record's full size
(FlashAttention-3's input checks, CUDA's autocast policy, the bf16 precision policy), with the parameter count and
the projected artifact size. The last line is the verdict; the exit code is 1 on any no-go.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import train_gpt
from tools import preflight_checks as pc
from tools.envfile import read_env_file


def show(row: pc.Check) -> None:
    mark = {True: "GO   ", False: "NO-GO", None: "info "}[row.ok]
    print(f"  {mark}  {row.name:<24} {row.detail}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env-file", type=Path, help="config as KEY=VALUE lines (default: the environment)")
    ap.add_argument("--disk-gb", type=float, default=40.0, help="free disk needed under DATA_DIR and OUT_DIR (GB; "
                    "128 SP8192 shards take 26 GB)")
    ap.add_argument("--code-bytes", type=int, default=None, help="code bytes for the size plan (default: the planner's)")
    ap.add_argument("--skip-plan", action="store_true", help="skip the roofline time plan (about 30 s on a CPU)")
    args = ap.parse_args(argv)
    try:
        env = read_env_file(args.env_file) if args.env_file else None
        cfg = train_gpt.Config.from_env(env)
    except (OSError, ValueError) as e:
        print(f"preflight: {e}", file=sys.stderr)
        return 2
    print(f"preflight: {'env file ' + str(args.env_file) if args.env_file else 'config from the environment'}", flush=True)
    rows: list[pc.Check] = []

    def step(title: str, fn: Callable[[], list[pc.Check]]) -> None:
        print(f"== {title}", flush=True)
        try:
            got = fn()
        except Exception as e:  # a check that crashes is a no-go with its reason, never a traceback
            got = [pc.Check(title, False, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")]
        for row in got:
            show(row)
        rows.extend(got)

    try:
        rt = train_gpt.setup_runtime(cfg)
    except RuntimeError as e:  # ATTENTION=fa3 without a usable FlashAttention-3
        reason = str(e)
        step("runtime", lambda: [pc.Check("attention", False, reason)])
        ok, line = pc.verdict(rows)
        print(line)
        return 1
    gpu = rt.device.type == "cuda"
    step("versions", lambda: pc.versions(rt))
    if gpu:
        step("gpus", pc.gpus)
    step("resources", lambda: pc.resources(pc.default_paths(cfg), args.disk_gb, required=gpu))
    step("dataset", lambda: pc.data(cfg, required=gpu)[0])
    if not args.skip_plan:
        from tools import artifact_size
        code = args.code_bytes if args.code_bytes is not None else artifact_size.DEFAULT_CODE_BYTES
        step("plan (roofline, 8xH100)", lambda: pc.plan(cfg, code))
    if not gpu:
        step("CUDA contracts, emulated at full size", lambda: pc.emulated_model(cfg))
    step("real steps on this device", lambda: pc.real_steps(cfg, rt))
    ok, line = pc.verdict(rows)
    print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
