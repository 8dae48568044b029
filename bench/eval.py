"""Eval benchmark: plain, sliding-window and phased score-first TTT throughput on a quantized cpu_tiny model.

Run from the repo root: `python bench/eval.py [--run runs/bench/ref] [--retrain] [--repeats 3]`. The run folder is
a trainer run of configs/cpu_tiny.env (ITERATIONS=120 instead of the 60 s cap) with the full pipeline (sliding window
and TTT on, like tools/dryrun.py); it is trained first when it has no run_summary.json (or with --retrain). Its artifact is
reloaded with the trainer's own loader and scored with `train_gpt.evaluate` (stride = seq_len, then EVAL_STRIDE)
and `evals.phased_ttt.eval_phased_ttt`, each repeated; every repeat starts from a fresh copy of the artifact (the TTT's
global phases change the weights). Prints val
tokens/s per mode (medians), the sliding/plain and TTT/sliding cost ratios (medians of per-repeat ratios, so slow
and fast moments cancel), and the share of each phase in the run's time ledger.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import train_gpt as tg
from bench.common import RUNS, md_table, median, progress, run_trainer, spread
from data.shards import load_data
from evals.phased_ttt import chunk_rows, context, eval_phased_ttt, make_plan

MODES = ("plain", "sliding", "ttt")
REF_STEPS = 120  # a step budget, not a time cap: the checkpoint bench/quant.py measures does not depend on machine load


def ensure_reference_run(run_dir: Path, retrain: bool, steps: int) -> None:
    """Train the cpu_tiny reference run into run_dir unless it is already there."""
    if not retrain and (run_dir / "run_summary.json").is_file():
        progress(f"reference run: reusing {run_dir}")
        return
    progress(f"reference run: configs/cpu_tiny.env with ITERATIONS={steps} and no wallclock cap, full pipeline (train, "
             "GPTQ, plain + sliding + TTT eval)")
    run_trainer(run_dir, {"ITERATIONS": str(steps), "MAX_WALLCLOCK_SECONDS": "0"}, "reference")


def run_mode(mode: str, model: tg.GPT, cfg: tg.Config, val: torch.Tensor, luts: tuple, rt: tg.Runtime) -> float:
    """One eval of the quantized model in `mode`; returns val_bpb."""
    L = cfg.eval_seq_len
    windows = max(1, cfg.val_batch_tokens // (tg.grad_accum_steps(cfg, 1) * L))
    ev = tg.EvalContext(luts, windows, rt.device, amp=rt.amp)
    if mode == "ttt":
        make = lambda bsz, gen: tg.TTTAdapters(model, bsz, cfg.ttt_lora_rank, cfg.ttt_lora_alpha, gen)
        return eval_phased_ttt(model, val, cfg, ev, make)[1]
    stride = L if mode == "plain" else cfg.eval_stride
    return tg.evaluate(model.forward_logits, val, L, stride, ev)[1]


def time_modes(cfg: tg.Config, artifact: Path, val: torch.Tensor, luts: tuple, repeats: int) -> dict[str, dict]:
    """Seconds and val_bpb of each eval mode over `repeats` rounds (plain, sliding, TTT in every round)."""
    rt = tg.setup_runtime(cfg)
    out = {m: {"seconds": [], "bpb": None} for m in MODES}
    for r in range(repeats):
        # TTT adapts the weights: a fresh copy every round
        model = tg.load_quantized_model(artifact, cfg, rt.device, rt.precision, rt.fa3)
        for mode in MODES:
            t = time.perf_counter()
            out[mode]["bpb"] = run_mode(mode, model, cfg, val, luts, rt)
            out[mode]["seconds"].append(time.perf_counter() - t)
        progress(f"  round {r + 1}/{repeats}: " + ", ".join(f"{m} {out[m]['seconds'][-1]:.1f}s" for m in MODES))
    return out


def ttt_work(val: torch.Tensor, cfg: tg.Config) -> tuple[int, int, int, int]:
    """(batches, chunk steps, rows run, positions run) of the phased TTT on val (one process, no padding)."""
    plan = make_plan(val, cfg.ttt_batch_size, cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases)
    C, W, steps, rows, positions = cfg.ttt_chunk_size, cfg.ttt_eval_seq_len, 0, 0, 0
    for batch in plan.queue:
        starts = torch.tensor([plan.docs[d][0] for d in batch])
        preds = torch.tensor([plan.docs[d][1] - 1 for d in batch])
        for ci in range(-(-int(preds.max()) // C)):
            T = context(ci, C, W, False)
            active = int(chunk_rows(val, starts, preds, ci, C, W, T).score.any(1).sum())
            steps, rows, positions = steps + 1, rows + active, positions + len(batch) * T
    return len(plan.queue), steps, rows, positions


def report(run_dir: Path, cfg: tg.Config, summary: dict, res: dict[str, dict], val: torch.Tensor) -> str:
    n, L, S = val.numel() - 1, cfg.eval_seq_len, cfg.eval_stride
    batches, steps, ttt_rows, ttt_positions = ttt_work(val, cfg)
    n_windows = {"plain": len(tg.window_starts(n, L, L)), "sliding": len(tg.window_starts(n, L, S)), "ttt": ttt_rows}
    positions = {"plain": n_windows["plain"] * L, "sliding": n_windows["sliding"] * L, "ttt": ttt_positions}
    work = {"plain": "forward", "sliding": "forward",
            "ttt": f"forward + backward + AdamW on adapters, {steps:,} steps in {batches} batches; global SGD phases"}
    rows = []
    for mode in MODES:
        secs = res[mode]["seconds"]
        rows.append([mode, f"{n_windows[mode]:,}", f"{positions[mode]:,}", work[mode], spread(secs, ".2f"),
                     f"{n / median(secs):,.0f}", f"{res[mode]['bpb']:.5f}"])
    out = [f"Run `{run_dir.name}`: {n:,} val tokens, EVAL_SEQ_LEN={L}, EVAL_STRIDE={S}; phased TTT: "
           f"TTT_CHUNK_SIZE={cfg.ttt_chunk_size}, TTT_EVAL_SEQ_LEN={cfg.ttt_eval_seq_len}, "
           f"TTT_BATCH_SIZE={cfg.ttt_batch_size}, TTT_LORA_RANK={cfg.ttt_lora_rank}, "
           f"{len(res['plain']['seconds'])} rounds, one process; quantized model (artifact reloaded). The TTT's "
           "\"windows\" are its document rows (one per document and chunk step).",
           "",
           md_table(["mode", "windows", "positions run", "work", "seconds: median (range)", "val tokens/s", "val_bpb"],
                    rows, "llrlrrr")]

    def per(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(res[a]["seconds"], res[b]["seconds"])]

    def ratio(a: str, b: str) -> str:
        return spread(per(a, b), ".2f")

    out += ["", md_table(["cost ratio (time)", "median of per-round ratios (range)"],
                         [["sliding / plain", ratio("sliding", "plain")], ["TTT / sliding", ratio("ttt", "sliding")],
                          ["TTT / plain", ratio("ttt", "plain")]], "lr"),
            "", f"TTT runs one forward and backward per chunk step of a batch (≤ {cfg.ttt_batch_size} document rows of "
            f"≤ {cfg.ttt_eval_seq_len} tokens), the sliding eval "
            f"{max(1, cfg.val_batch_tokens // (tg.grad_accum_steps(cfg, 1) * L))} windows per forward."]
    ledger = summary["time_ledger"]
    total = sum(row["seconds"] for row in ledger)
    rows = [[row["phase"], row["budget"], f"{row['seconds']:.1f}", f"{100 * row['seconds'] / total:.1f}%"]
            for row in ledger]
    ev, tr = summary["time_totals"]["eval"], summary["time_totals"]["train"]
    rows.append(["**total**", "", f"{total:.1f}", "100%"])
    out += ["", f"Time ledger of the run (`{run_dir.name}/run_summary.json`, {summary['steps']} training steps):", "",
            md_table(["phase", "budget", "seconds", "share of run"], rows, "llrr"), "",
            f"Eval budget (sliding + TTT) {ev:.1f} s = {100 * ev / total:.1f}% of the run's ledger "
            f"({100 * ev / (ev + tr):.1f}% of train + eval budgets); train budget {tr:.1f} s.", "",
            f"**Eval throughput**: plain {n / median(res['plain']['seconds']):,.0f}, sliding "
            f"{n / median(res['sliding']['seconds']):,.0f}, TTT {n / median(res['ttt']['seconds']):,.0f} val tokens/s; "
            f"cost sliding/plain {median(per('sliding', 'plain')):.2f}x, TTT/sliding {median(per('ttt', 'sliding')):.2f}x; "
            f"sliding + TTT = {100 * ev / total:.0f}% of a dry-run-style run's time."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=RUNS / "ref",
                   help="trainer run folder (run_summary.json, final_model.int6.ptz); trained here if missing")
    p.add_argument("--retrain", action="store_true", help="train the reference run again even if it exists")
    p.add_argument("--steps", type=int, default=REF_STEPS,
                   help="training steps (ITERATIONS, no wallclock cap) of a reference run trained here")
    p.add_argument("--repeats", type=int, default=3, help="rounds of plain + sliding + TTT eval")
    p.add_argument("--val-tokens", type=int, default=0,
                   help="score only the first N val tokens (rounded down to whole EVAL_SEQ_LEN sequences); 0 = all")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.val_tokens < 0 or args.steps < 1:
        p.error("need --repeats >= 1, --val-tokens >= 0 and --steps >= 1")
    run_dir = args.run.resolve()
    os.chdir(Path(__file__).resolve().parent.parent)  # the run's data paths are relative to the repo root
    ensure_reference_run(run_dir, args.retrain, args.steps)
    summary_path, artifact = run_dir / "run_summary.json", run_dir / "final_model.int6.ptz"
    for path in (summary_path, artifact):
        if not path.is_file():
            print(f"bench/eval.py: {path} not found; train the run with --retrain", file=sys.stderr)
            return 2
    try:
        cfg = tg.Config.from_summary(summary_path)
        data = load_data(cfg.dataset_dir, cfg.tokenizer_file, cfg.vocab_size, cfg.eval_seq_len)
        luts, val = data.luts, data.val_tokens
    except (OSError, ValueError, KeyError) as e:
        print(f"bench/eval.py: {e}", file=sys.stderr)
        return 2
    except TypeError as e:  # a run_summary.json of an older trainer (other config fields)
        print(f"bench/eval.py: {summary_path}: {e}; train the run again with --retrain", file=sys.stderr)
        return 2
    if args.val_tokens:
        usable = min(args.val_tokens, val.numel() - 1) // cfg.eval_seq_len * cfg.eval_seq_len
        if usable < cfg.eval_seq_len:
            p.error(f"--val-tokens must keep at least one window ({cfg.eval_seq_len} tokens)")
        val = val[: usable + 1]
    summary = json.loads(summary_path.read_text())
    progress(f"eval bench: {args.repeats} rounds on {val.numel() - 1:,} val tokens ({cfg.eval_seq_len}-token windows)")
    res = time_modes(cfg, artifact, val, luts, args.repeats)
    print(report(run_dir, cfg, summary, res, val))
    return 0


if __name__ == "__main__":
    sys.exit(main())
