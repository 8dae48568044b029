"""Compare training runs: a table of final numbers and a 2x2 PNG of their curves.

Usage: `python tools/compare_runs.py LOG [LOG...] [--labels A B ...] [--out runs.png]`

Reads any log tools/parse_log.py reads (ours, upstream records, root baseline). The table has one row per log: label,
seed, steps, ms/step, bytes_total and the bpb of every eval stage present in any log (pipeline order). The PNG has
train loss (top) and val bpb (bottom) against step (left) and train wallclock in minutes (right); times of
record-format step lines come from parse_log (exact via tok/s where possible).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from tools.parse_log import parse_log, read_log


def default_labels(paths: list[Path]) -> list[str]:
    """File stems, or parent/stem when stems collide (train_seed42.log of two records)."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{p.parent.name}/{p.stem}" for p in paths]


def stage_labels(runs: list[dict[str, Any]]) -> list[str]:
    """Union of eval labels over runs, each run's pipeline order kept, first-seen order across runs."""
    out: list[str] = []
    for run in runs:
        out += [lab for lab in run["evals"] if lab not in out]
    return out


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(labels: list[str], runs: list[dict[str, Any]]) -> str:
    stages = stage_labels(runs)
    head = ["run", "seed", "steps", "ms/step", "bytes_total", *stages]
    rows = [
        [
            label,
            _fmt(run["seed"], "d"),
            _fmt(run["steps"], "d"),
            _fmt(run["step_avg_ms"], ".2f") + ("~" if run["train_time_approx"] else ""),
            _fmt(run["bytes_total"], ",d"),
            *[_fmt(run["evals"].get(s, {}).get("val_bpb"), ".5f") + ("*" if s == run["final_label"] else " ")
              for s in stages],
        ]
        for label, run in zip(labels, runs, strict=True)
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = ["* = the run's final (headline) stage"]
    if any(run["train_time_approx"] for run in runs):
        notes.append("~ = train time estimated from minute-resolution step lines")
    return "\n".join(lines + notes)


def focus_ylim(values: list[float]) -> tuple[float, float] | None:
    """Y range that shows the late-training spread instead of the step-0 spike (loss 9 vs 3)."""
    vals = [v for v in values if v == v and abs(v) != float("inf")]
    if len(vals) < 2:
        return None
    lo, med = min(vals), statistics.median(vals)
    hi = min(max(vals), med + 3.0 * (med - lo))
    if hi <= lo:
        return None
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def plot_runs(labels: list[str], runs: list[dict[str, Any]], out: Path) -> None:
    """Write the 2x2 figure to `out` atomically (temp file in the same directory, then os.replace)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8), squeeze=False)
    panels = [("train", "train_loss", "train loss"), ("val", "val_bpb", "val bpb")]
    for row, (curve, key, name) in enumerate(panels):
        for col, xname in enumerate(("step", "train wallclock (min)")):
            ax = axes[row][col]
            ys_all: list[float] = []
            for label, run in zip(labels, runs, strict=True):
                pts = run[curve] if col == 0 else [p for p in run[curve] if p["train_time_ms"] is not None]
                xs = [p["step"] if col == 0 else p["train_time_ms"] / 60000.0 for p in pts]
                ys = [p[key] for p in pts]
                if xs:
                    ax.plot(xs, ys, marker="o" if curve == "val" else None, markersize=3, label=label)
                    ys_all += ys
            ylim = focus_ylim(ys_all)
            if ylim:
                ax.set_ylim(*ylim)
            ax.set_xlabel(xname)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            if ys_all:
                ax.legend(fontsize=8)
    fig.suptitle("train loss and val bpb (y clipped to the late-training range)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # same directory, so os.replace is atomic
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compare training logs: final-number table and loss/bpb curves PNG.")
    ap.add_argument("logs", nargs="+", type=Path, help="log files to compare (any format tools/parse_log.py reads)")
    ap.add_argument("--labels", nargs="+", help="one display label per log (default: file stems)")
    ap.add_argument("--out", type=Path, help="PNG path (default: <first log's stem>_compare.png next to it)")
    args = ap.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.logs):
        print(f"error: --labels gives {len(args.labels)} labels for {len(args.logs)} logs", file=sys.stderr)
        return 2
    try:
        runs = [parse_log(read_log(p)) for p in args.logs]
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, run in zip(args.logs, runs, strict=True):
        if run["format"] is None:
            print(f"warning: {path}: no recognizable log lines", file=sys.stderr)
    labels = args.labels or default_labels(args.logs)
    print(format_table(labels, runs))
    out = args.out or args.logs[0].with_name(f"{args.logs[0].stem}_compare.png")
    try:
        plot_runs(labels, runs, out)
    except OSError as e:
        print(f"error: cannot write {out}: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
