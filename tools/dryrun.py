"""The whole pipeline on a CPU machine in about 3 minutes: data -> train -> quantize -> eval -> record -> check.

Builds the builtin dataset if missing, trains the scaled-down record stack of configs/cpu_tiny.env with torchrun
(train, GPTQ, artifact, reload, quantized + sliding-window + TTT eval), packs a record folder under runs/ with
tools/build_record.py and checks it with tools/check_record.py. The last line is a contract (keep it stable):

    dryrun: val_bpb=<float> bytes_total=<int> limit=16000000 seconds=<float> record=<path>
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tools.envfile import read_env_file

ROOT = Path(__file__).resolve().parent.parent

LIMIT = 16_000_000


def contract_line(val_bpb: float, bytes_total: int, seconds: float, record: Path) -> str:
    return f"dryrun: val_bpb={val_bpb:.8f} bytes_total={bytes_total} limit={LIMIT} seconds={seconds:.1f} record={record}"


def step(title: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
    """Run a command from the repo root, streaming its output indented; stop the dry run if it fails."""
    print(f"== {title}: {' '.join(cmd[:4])}{' ...' if len(cmd) > 4 else ''}", flush=True)
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if not line.startswith(("W1", "W0")) or "torch/distributed/run.py" not in line:  # torchrun's OMP banner
            print(f"   {line}", end="", flush=True)
    if proc.wait():
        raise SystemExit(f"dryrun: FAILED at '{title}' (exit {proc.returncode})")
    print(f"   ({time.perf_counter() - t:.1f}s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "cpu_tiny.env", help="env file of the CPU config")
    p.add_argument("--seconds", type=float, help="training wallclock cap (default: MAX_WALLCLOCK_SECONDS of --config)")
    p.add_argument("--nproc", type=int, default=1, help="torchrun processes (1 or 2 on a 2-core machine)")
    p.add_argument("--seed", type=int, default=1337, help="SEED of the run")
    p.add_argument("--out", type=Path, help="run folder (default: runs/dryrun_<time>); the record goes in <out>/record")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = (args.out or ROOT / "runs" / time.strftime("dryrun_%Y%m%d_%H%M%S")).resolve()
    try:
        cfg_env = read_env_file(args.config)
    except (OSError, ValueError) as e:
        print(f"dryrun: {e}", file=sys.stderr)
        return 2

    from data.builtin_corpus import ensure_builtin_dataset

    print("== dataset: builtin corpus (gensim test data, Wikipedia + news)", flush=True)
    ensure_builtin_dataset()
    env = {**os.environ, **cfg_env, "OUT_DIR": str(out), "RUN_ID": f"dryrun_seed{args.seed}", "SEED": str(args.seed)}
    if args.seconds is not None:
        env["MAX_WALLCLOCK_SECONDS"] = str(args.seconds)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    step("train + quantize + eval", [*torchrun, "train_gpt.py"], env)
    record = out / "record"
    step("build record", [sys.executable, "tools/build_record.py", "--run", str(out), "--name", "CPU dry run",
                          "--track", "non_record_16mb", "--out", str(record)])
    # --no-run: build_record has just smoke-run this packed file in the sandbox; the full sandboxed run costs ~30 s more
    step("check record", [sys.executable, "tools/check_record.py", "--no-run", str(record)])
    sub = json.loads((record / "submission.json").read_text())
    print(contract_line(sub["val_bpb"], sub["bytes_total"], time.perf_counter() - t0, record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
