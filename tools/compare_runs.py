"""Compare training runs: a table of final numbers and a 2x2 PNG of their curves.

Usage: `python tools/compare_runs.py LOG [LOG...] [--labels A B ...] [--out runs.png]`

The logic (short labels, stage normalization, tokenizer warning, plotting) lives in tools/runplots.py.

Reads any log tools/parse_log.py reads (ours, upstream records, root baseline). The table has one row per log: label,
seed, steps, ms/step, bytes_total and the bpb of every eval stage present in any log (pipeline order). The PNG has
train loss (top) and val bpb (bottom) against step (left) and train wallclock in minutes (right); times of
record-format step lines come from parse_log (exact via tok/s where possible).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.log_parser import parse_log
from tools.runplots import default_labels, focus_ylim, format_table, plot_runs, stage_key  # noqa: F401
from tools.safe_io import read_log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compare training logs: final-number table and loss/bpb curves PNG.")
    ap.add_argument("logs", nargs="+", type=Path, help="log files to compare (any format tools/parse_log.py reads)")
    ap.add_argument("--labels", nargs="+", help="one display label per log (default: short file-stem labels)")
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
