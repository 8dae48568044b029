"""Training benchmark: the record stack (configs/cpu_tiny.env) vs the root baseline's architecture at the same width,
and tokens/s eager vs torch.compile.

Run from the repo root: `python bench/train.py [--repeats 2] [--seconds 60]`. Every run is `python train_gpt.py` with
configs/cpu_tiny.env plus env overrides (no other code path): the baseline arm is expressed with Config overrides
only (`baseline_overrides`, each commented; NOT_EXPRESSIBLE lists what cannot be). Both arms get the same batch
(TRAIN_BATCH_TOKENS, TRAIN_SEQ_LEN), seeds and eval; sliding window and TTT are off, so each run ends with the plain
pre-quantization and quantized (GPTQ int6, the trainer's export for both arms) val_bpb.

* Equal CPU time: runs alternate stack, baseline, stack, baseline, ... (repeat i uses SEED=1337+i for both arms),
  each with MAX_WALLCLOCK_SECONDS=--seconds. Medians over repeats, and the median of the per-repeat deltas.
* Equal tokens: in each repeat the arm that made more steps is run again with ITERATIONS = the other arm's steps and
  no wallclock cap (its schedule then runs on steps), so both arms have seen the same tokens with the same seed.
* Compile: the stack config with COMPILE=1 vs eager, --compile-seconds each; tokens/s = steps x TRAIN_BATCH_TOKENS /
  the train_loop seconds of the time ledger (compile warm-up excluded). One compiled run on an empty
  TORCHINDUCTOR_CACHE_DIR first (its warm-up is the cold compile time; its tok/s is shown but not used: the speed-up
  compares warm-cache runs), then alternating eager / compiled pairs on the warm cache.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import RUNS, TrainerRun, md_table, median, progress, run_trainer, spread, stamp, tiny_env


def baseline_overrides(num_layers: int) -> dict[str, str]:
    """The root baseline (upstream's root train_gpt.py: 9L x 512d, MLP 2x relu^2, Adam/Muon without WD, no EMA)
    at the tiny stack's width, heads, batch and sequence length, with `num_layers` layers. LRs and momenta are the
    baseline's own, unscaled, as configs/cpu_tiny.env keeps the record's; step counts are scaled like cpu_tiny's
    (1500 -> 50)."""
    env = tiny_env()
    head_dim = int(env["MODEL_DIM"]) // int(env["NUM_HEADS"])
    return {
        "NUM_LAYERS": str(num_layers),
        "MLP_MULT": "2",  # MLP 2x ...
        "MLP_LEAKY_SLOPE": "0",  # ... relu^2
        "ROPE_DIMS": str(head_dim),  # RoPE on the full head
        "QK_GAIN_INIT": "1.5",
        "XSA_LAST_N": "0",  # no XSA
        "NUM_LOOPS": "0",  # no depth recurrence
        "PARALLEL_RESIDUAL_START": str(num_layers),  # no parallel residuals
        "SKIP_GATES_ENABLED": "0",  # additive U-Net skips
        "LN_SCALE": "0",  # no 1/sqrt(layer+1) norm scale
        "MUON_ROW_NORMALIZE": "0",  # plain Muon, not MuonEq-R
        "MUON_WD": "0",
        "ADAM_WD": "0",  # AdamW with wd 0 is Adam: exactly the baseline's optimizer
        "EMBED_WD": "0",
        "EMA_DECAY": "0",  # ema = weights every step: no EMA
        "MATRIX_LR": "0.04",
        "SCALAR_LR": "0.04",
        "TIED_EMBED_LR": "0.05",
        "MUON_MOMENTUM": "0.95",
        "MUON_MOMENTUM_WARMUP_START": "0.85",
        "MUON_MOMENTUM_WARMUP_STEPS": "17",  # 500 steps scaled like cpu_tiny's 1500 -> 50
        "GRAD_CLIP_NORM": "0",
        "WARMDOWN_FRAC": "0.087",  # 1200 warmdown iterations of the baseline's 13,780 steps in 600 s
    }


NOT_EXPRESSIBLE = [
    "init: the baseline uses PyTorch's default (Kaiming-uniform) init for the non-zero-init matrices; the trainer "
    "always uses orthogonal init",
    "data order: the baseline's TokenStream reads the shards sequentially; the trainer's loader shuffles sequences",
    "warmdown: the baseline's is wallclock-aware (last 1200 x step_ms); here a fixed WARMDOWN_FRAC=0.087, its "
    "measured share of a 600 s run (both linear to 0)",
    "export: the baseline ships int8 per-row + zlib; both arms here use the trainer's GPTQ int6 + brotli "
    "(bench/quant.py compares the exports on one checkpoint)",
    "shape: the baseline's TRAIN_SEQ_LEN=1024 / 524,288-token batches / 20 warm-up steps; both arms here use "
    "cpu_tiny's 256 / 8,192 / 2",
]


def common_overrides(seconds: float, seed: int) -> dict[str, str]:
    return {"MAX_WALLCLOCK_SECONDS": f"{seconds:g}", "SEED": str(seed), "SLIDING_WINDOW_ENABLED": "0",
            "TTT_ENABLED": "0", "VAL_LOSS_EVERY": "0"}


PRE, QUANT = "pre-quantization post-ema", "quantized"


def ab_runs(out: Path, repeats: int, seconds: float, base: dict[str, str]) -> tuple[dict, dict]:
    """Equal-time A/B/A/B runs, then the equal-token re-runs; returns {arm: [runs]} for both budgets."""
    arms = {"stack": {}, "baseline": base}
    timed: dict[str, list[TrainerRun]] = {a: [] for a in arms}
    for i in range(repeats):
        for arm, over in arms.items():
            timed[arm].append(run_trainer(out / f"time_{arm}_{i}", {**common_overrides(seconds, 1337 + i), **over},
                                          f"equal time, {arm}, repeat {i + 1}/{repeats}"))
    tokens: dict[str, list[TrainerRun]] = {a: [] for a in arms}
    for i in range(repeats):
        steps = {a: timed[a][i].summary["steps"] for a in arms}
        fast, slow = sorted(arms, key=lambda a: -steps[a])
        tokens[slow].append(timed[slow][i])
        over = {**common_overrides(0, 1337 + i), **arms[fast], "ITERATIONS": str(steps[slow])}
        tokens[fast].append(run_trainer(out / f"tokens_{fast}_{i}", over,
                                        f"equal tokens, {fast} for {steps[slow]} steps, repeat {i + 1}/{repeats}"))
    return timed, tokens


def compile_runs(out: Path, repeats: int, seconds: float) -> dict[str, list[TrainerRun]]:
    """One compiled run on an empty inductor cache (the cold compile), then `repeats` pairs of eager and compiled
    (warm cache) runs of the stack config, alternating."""
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(out / "inductor_cache")}

    def one(mode: str, i: int, label: str) -> TrainerRun:
        over = {**common_overrides(seconds, 1337), "COMPILE": "1" if mode != "eager" else "0"}
        return run_trainer(out / f"compile_{mode}_{i}", over, label, cache if mode != "eager" else None)

    runs: dict[str, list[TrainerRun]] = {"cold": [one("cold", 0, "compiled, empty inductor cache")],
                                         "eager": [], "compiled": []}
    for i in range(repeats):
        for mode in ("eager", "compiled"):
            runs[mode].append(one(mode, i, f"{mode}{' (warm cache)' if mode == 'compiled' else ''}, "
                                           f"pair {i + 1}/{repeats}"))
    return runs


def arm_table(runs: dict[str, list[TrainerRun]]) -> str:
    rows = []
    for arm, rs in runs.items():
        pre, q = [r.bpb(PRE) for r in rs], [r.bpb(QUANT) for r in rs]
        rows.append([arm, f"{rs[0].summary['model_params']:,}", spread([r.summary["steps"] for r in rs], ".0f"),
                     f"{median([r.summary['steps'] * r.summary['config']['train_batch_tokens'] for r in rs]):,.0f}",
                     f"{median([r.train_tok_s for r in rs]):,.0f}", spread(pre, ".4f"), spread(q, ".4f"),
                     f"{median([b - a for a, b in zip(pre, q)]):+.4f}"])
    return md_table(["arm", "params", "steps", "train tokens", "tok/s", "pre-quant val_bpb", "quantized val_bpb",
                     "quant gap"], rows)


def delta_line(runs: dict[str, list[TrainerRun]], budget: str) -> str:
    parts = []
    for label, key in (("pre-quant", PRE), ("quantized", QUANT)):
        d = [a.bpb(key) - b.bpb(key) for a, b in zip(runs["stack"], runs["baseline"])]
        parts.append(f"{label} {spread(d, '+.4f')}")
    return (f"**stack − baseline val_bpb at {budget}** (median of per-repeat deltas; negative = the stack is better): "
            + "; ".join(parts))


def run_rows(runs: dict[str, list[TrainerRun]], budget: str) -> list[list[str]]:
    rows = []
    for arm, rs in runs.items():
        for r in rs:
            c = r.summary["config"]
            cap = f"{c['max_wallclock_seconds']:g} s" if c["max_wallclock_seconds"] > 0 else f"{c['iterations']} steps"
            rows.append([r.out_dir.name, budget, arm, str(r.summary["seed"]), cap, str(r.summary["steps"]),
                         f"{r.train_tok_s:,.0f}", f"{r.bpb(PRE):.4f}", f"{r.bpb(QUANT):.4f}", f"{r.wall_s:.0f}"])
    return rows


def compile_table(runs: dict[str, list[TrainerRun]]) -> str:
    labels = {"cold": "compiled, empty cache (run 1)", "eager": "eager", "compiled": "compiled, warm cache"}
    rows = [[labels[mode], str(len(rs)), spread([r.train_tok_s for r in rs], ",.0f"),
             spread([r.ledger["compile_warmup"] for r in rs], ".1f"), spread([r.wall_s for r in rs], ".0f")]
            for mode, rs in runs.items()]
    ratios = [c.train_tok_s / e.train_tok_s for c, e in zip(runs["compiled"], runs["eager"])]
    table = md_table(["mode", "runs", "train tok/s: median (range)", "warm-up s (compile + 2x2 steps)",
                      "process wall s"], rows)
    warm = {mode: median([r.ledger["compile_warmup"] for r in rs]) for mode, rs in runs.items()}
    return (f"{table}\n\n**compile speed-up (tok/s compiled / eager, warm cache)**: {spread(ratios, '.2f')} over "
            f"alternating pairs; warm-up (compile) {warm['cold']:.0f} s cold, {warm['compiled']:.0f} s on the warm cache, "
            f"{warm['eager']:.0f} s eager.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="A/B pairs (stack, baseline) per budget")
    p.add_argument("--seconds", type=float, default=float(tiny_env()["MAX_WALLCLOCK_SECONDS"]),
                   help="MAX_WALLCLOCK_SECONDS of every equal-time run (default: configs/cpu_tiny.env's)")
    p.add_argument("--baseline-layers", type=int, default=int(tiny_env()["NUM_LAYERS"]),
                   help="NUM_LAYERS of the baseline arm (default: the tiny stack's physical layers)")
    p.add_argument("--compile-repeats", type=int, default=2,
                   help="eager/compiled pairs after the cold-compile run (0 = skip the compile part)")
    p.add_argument("--compile-seconds", type=float, default=15.0, help="MAX_WALLCLOCK_SECONDS of the compile runs")
    p.add_argument("--out", type=Path, help="folder of the runs (default: runs/bench/train_<time>)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.compile_repeats < 0 or args.seconds <= 0 or args.compile_seconds <= 0 \
            or args.baseline_layers < 1:
        p.error("need --repeats >= 1, --compile-repeats >= 0, --seconds > 0, --compile-seconds > 0, --baseline-layers >= 1")
    out = (args.out or RUNS / f"train_{stamp()}").resolve()
    base = baseline_overrides(args.baseline_layers)
    progress(f"train bench: {args.repeats} x (stack, baseline) at {args.seconds:g} s, then equal-token re-runs; "
             f"{args.compile_repeats} x (compiled, eager) at {args.compile_seconds:g} s -> {out}")
    timed, tokens = ab_runs(out, args.repeats, args.seconds, base)
    env = tiny_env()
    lines = [f"Width {env['MODEL_DIM']}, {env['NUM_HEADS']} heads / {env['NUM_KV_HEADS']} KV heads, batch "
             f"{int(env['TRAIN_BATCH_TOKENS']):,} tokens of seq {env['TRAIN_SEQ_LEN']}, vocab {env['VOCAB_SIZE']}; "
             f"stack = configs/cpu_tiny.env ({env['NUM_LAYERS']} layers, layers {env['LOOP_START']}..{env['LOOP_END']} "
             f"looped x{int(env['NUM_LOOPS']) + 1}); baseline = {args.baseline_layers} layers. Runs in `{out.name}`.",
             "", f"Equal CPU time ({args.seconds:g} s wallclock cap per run, {args.repeats} interleaved "
             f"pair{'s' if args.repeats > 1 else ''}):", "",
             arm_table(timed), "", delta_line(timed, f"equal CPU time ({args.seconds:g} s)"), "",
             "Equal tokens (the arm with more steps re-run for the other's step count, same seed):", "",
             arm_table(tokens), "", delta_line(tokens, "equal tokens"), "", "Every run, in the order it ran:", "",
             md_table(["run", "budget", "arm", "seed", "cap", "steps", "tok/s", "pre-quant", "quantized", "wall s"],
                      run_rows(timed, "time") + [r for r in run_rows(tokens, "tokens") if r[0].startswith("tokens_")],
                      "llllrrrrrr"),
             "", "Baseline arm overrides (on top of configs/cpu_tiny.env): "
             + ", ".join(f"`{k}={v}`" for k, v in base.items()) + ".", "", "Not expressible with Config overrides:", ""]
    lines += [f"- {item}" for item in NOT_EXPRESSIBLE]
    if args.compile_repeats:
        runs = compile_runs(out, args.compile_repeats, args.compile_seconds)
        lines += ["", f"torch.compile vs eager, stack config, {args.compile_seconds:g} s runs: one compiled run on an "
                  f"empty TORCHINDUCTOR_CACHE_DIR ({out.name}/inductor_cache), then alternating eager / compiled pairs:",
                  "",
                  compile_table(runs)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
