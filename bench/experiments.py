"""Experiments benchmark: the record stack vs the Transformer || SSM hybrid vs strict ±1 weights at equal CPU time,
and a step sweep of ±1 (and of the stack) that tests the "about -0.08 per doubling of training steps" rule.

Run from the repo root: `python -m bench.experiments [--seconds 60] [--repeats 1] [--sweep-steps 30]`. Every run is
`python <entry>` (train_gpt.py, experiments/hybrid_ssm.py, experiments/pm1.py) with configs/cpu_tiny.env plus env
overrides: same width, depth, batch, sequence length, seeds and data; sliding window and TTT are off, so each run ends
with the plain pre-quantization and quantized val_bpb (the hybrid also scores its forced gates).

* Equal CPU time: the arms alternate (stack, hybrid, pm1, stack, ...), each with MAX_WALLCLOCK_SECONDS=--seconds,
  repeat i with SEED=1337+i. bits/param = artifact bytes x 8 / model parameters (the whole model: embedding, blocks,
  control tensors).
* Step sweep: ITERATIONS = S, 2S, 4S without a wallclock cap (each run has its whole LR schedule), for pm1 and the
  stack; the change of val_bpb per doubling is each run minus the run with half its steps.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from bench.common import RUNS, TrainerRun, md_table, median, progress, run_trainer, spread, stamp, tiny_env

ENTRIES = {"stack": "train_gpt.py", "hybrid": "experiments/hybrid_ssm.py", "pm1": "experiments/pm1.py"}
PRE, QUANT = "pre-quantization post-ema", "quantized"
GATES = ("quantized_gate1", "quantized_gate0")  # the hybrid's forced-gate scores: surface only, latent only
GATE_LINE = re.compile(r"^hybrid_gate step:(\d+) layer:0 mean:([-\d.eE+]+)", re.M)
RULE = -0.08  # the reported strict ±1 change per doubling of training steps (bits per character, TinyStories)


def common_overrides(seconds: float, seed: int) -> dict[str, str]:
    return {"MAX_WALLCLOCK_SECONDS": f"{seconds:g}", "SEED": str(seed), "SLIDING_WINDOW_ENABLED": "0",
            "TTT_ENABLED": "0", "VAL_LOSS_EVERY": "0"}


def bits_per_param(r: TrainerRun) -> float:
    return 8 * r.summary["bytes_model"] / r.summary["model_params"]


def equal_time(out: Path, arms: list[str], repeats: int, seconds: float) -> dict[str, list[TrainerRun]]:
    runs: dict[str, list[TrainerRun]] = {a: [] for a in arms}
    for i in range(repeats):
        for arm in arms:
            runs[arm].append(run_trainer(out / f"time_{arm}_{i}", common_overrides(seconds, 1337 + i),
                                         f"equal time, {arm}, repeat {i + 1}/{repeats}", script=ENTRIES[arm]))
    return runs


def sweep(out: Path, arms: list[str], base_steps: int, doublings: int) -> dict[str, list[TrainerRun]]:
    runs: dict[str, list[TrainerRun]] = {a: [] for a in arms}
    for k in range(doublings + 1):
        for arm in arms:
            steps = base_steps * 2**k
            over = {**common_overrides(0, 1337), "ITERATIONS": str(steps)}
            runs[arm].append(run_trainer(out / f"sweep_{arm}_{steps}", over, f"sweep, {arm}, {steps} steps",
                                         script=ENTRIES[arm]))
    return runs


def time_table(runs: dict[str, list[TrainerRun]]) -> str:
    rows = []
    for arm, rs in runs.items():
        pre, q = [r.bpb(PRE) for r in rs], [r.bpb(QUANT) for r in rs]
        rows.append([arm, f"`{ENTRIES[arm]}`", f"{rs[0].summary['model_params']:,}",
                     spread([r.summary["steps"] for r in rs], ".0f"), f"{median([r.train_tok_s for r in rs]):,.0f}",
                     spread(pre, ".4f"), spread(q, ".4f"), f"{median([b - a for a, b in zip(pre, q)]):+.4f}",
                     f"{median([r.summary['bytes_model'] for r in rs]):,.0f}",
                     f"{median([r.summary['bytes_total'] for r in rs]):,.0f}",
                     f"{median([bits_per_param(r) for r in rs]):.2f}"])
    return md_table(["arm", "entry", "params", "steps", "tok/s", "pre-quant val_bpb", "quantized val_bpb", "quant gap",
                     "model bytes", "total bytes", "bits/param"], rows, "llrrrrrrrrr")


def gate_line(rs: list[TrainerRun]) -> str:
    """The hybrid's learned-gate score against its forced gates (the 'dependency inversion' test)."""
    parts = [f"learned gate {median([r.bpb(QUANT) for r in rs]):.4f}"]
    for label, name in zip(GATES, ("g=1 (decoder only)", "g=0 (SSM only)")):
        if all(label in r.summary["evals"] for r in rs):
            parts.append(f"{name} {median([r.bpb(label) for r in rs]):.4f}")
    means = gate_trajectory(Path(rs[0].summary["log"]))
    if means:
        shown = means[:: max(1, len(means) // 8)]
        parts.append(f"gate mean over training (repeat 1, step:mean): {' → '.join(f'{s}:{m:.3f}' for s, m in shown)}"
                     f" (last {means[-1][0]}:{means[-1][1]:.3f})")
    return "**hybrid quantized val_bpb, learned vs forced gate**: " + "; ".join(parts)


def gate_trajectory(log: Path) -> list[tuple[int, float]]:
    """(step, mean gate) of the hybrid's `hybrid_gate step:k layer:0 mean:g codes:n/R` training lines."""
    return [(int(m[1]), float(m[2])) for m in GATE_LINE.finditer(log.read_text(encoding="utf-8", errors="replace"))]


def sweep_table(runs: dict[str, list[TrainerRun]]) -> tuple[str, list[str]]:
    rows, heads = [], []
    for arm, rs in runs.items():
        deltas = []
        for k, r in enumerate(rs):
            d = "" if k == 0 else f"{r.bpb(QUANT) - rs[k - 1].bpb(QUANT):+.4f}"
            if k:
                deltas.append(r.bpb(QUANT) - rs[k - 1].bpb(QUANT))
            rows.append([arm, str(r.summary["steps"]), f"{r.summary['steps'] * r.summary['config']['train_batch_tokens']:,}",
                         f"{r.bpb(PRE):.4f}", f"{r.bpb(QUANT):.4f}", d, f"{bits_per_param(r):.2f}"])
        heads.append(f"{arm} {', '.join(f'{d:+.4f}' for d in deltas)}")
    table = md_table(["arm", "steps", "train tokens", "pre-quant val_bpb", "quantized val_bpb", "Δ per doubling",
                      "bits/param"], rows)
    return table, heads


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="MAX_WALLCLOCK_SECONDS of every equal-time run")
    p.add_argument("--repeats", type=int, default=1, help="interleaved rounds of the three arms")
    p.add_argument("--sweep-steps", type=int, default=30, help="S: the sweep runs S, 2S, 4S steps (0 = no sweep)")
    p.add_argument("--doublings", type=int, default=2, help="number of doublings in the sweep")
    p.add_argument("--arms", default=",".join(ENTRIES), help=f"equal-time arms, comma-separated ({', '.join(ENTRIES)})")
    p.add_argument("--out", type=Path, help="folder of the runs (default: runs/bench/experiments_<time>)")
    args = p.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    if not arms or any(a not in ENTRIES for a in arms):
        p.error(f"--arms: choose from {', '.join(ENTRIES)}")
    if args.seconds <= 0 or args.repeats < 1 or args.sweep_steps < 0 or args.doublings < 1:
        p.error("need --seconds > 0, --repeats >= 1, --sweep-steps >= 0, --doublings >= 1")
    out = (args.out or RUNS / f"experiments_{stamp()}").resolve()
    progress(f"experiments bench: {args.repeats} x ({', '.join(arms)}) at {args.seconds:g} s, then a sweep of "
             f"{args.sweep_steps} x 2^0..{args.doublings} steps -> {out}")
    timed = equal_time(out, arms, args.repeats, args.seconds)
    env = tiny_env()
    lines = [f"Width {env['MODEL_DIM']}, {env['NUM_LAYERS']} layers, batch {int(env['TRAIN_BATCH_TOKENS']):,} tokens of "
             f"seq {env['TRAIN_SEQ_LEN']}, vocab {env['VOCAB_SIZE']} (configs/cpu_tiny.env); each experiment's own "
             f"fields at their defaults. Runs in `{out.name}`. CPU runs on the builtin corpus: they compare the arms at "
             f"this scale, they say nothing direct about 8×H100 scores.", "",
             f"Equal CPU time ({args.seconds:g} s wallclock cap per run, {args.repeats} interleaved round"
             f"{'s' if args.repeats > 1 else ''}):", "", time_table(timed)]
    if "stack" in timed:
        for arm in (a for a in arms if a != "stack"):
            d = [r.bpb(QUANT) - s.bpb(QUANT) for r, s in zip(timed[arm], timed["stack"])]
            lines += ["", f"**{arm} − stack quantized val_bpb at equal CPU time ({args.seconds:g} s)** (negative = "
                          f"{arm} is better): {spread(d, '+.4f')}"]
    if "hybrid" in timed:
        lines += ["", gate_line(timed["hybrid"])]
    if args.sweep_steps:
        sweep_arms = [a for a in ("pm1", "stack") if a in arms]
        table, heads = sweep_table(sweep(out, sweep_arms, args.sweep_steps, args.doublings))
        lines += ["", f"Step sweep (ITERATIONS = {args.sweep_steps} × 2^k, no wallclock cap, SEED=1337):", "", table, "",
                  f"**quantized val_bpb per doubling of steps**: {'; '.join(heads)} (the reported strict ±1 rule: "
                  f"about {RULE:+.2f} bits per character per doubling)"]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
