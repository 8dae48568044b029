"""Is a candidate a record? One-sided Welch t-test of per-seed final val_bpb against a reference's, with the
challenge's 0.005-nat margin converted to bits per byte at the reference's tokenizer.

    python tools/stats.py --candidate runs/seed*/logs/*.txt --reference records/track_10min_16mb/<sota>/

Each argument is a log file or a folder (its *.log and *.txt files, and those under logs/). The statistics live in
tools/significance.py (importable: welch_one_sided, nats_to_bpb, tokens_per_byte, seeds_needed, mean_std, ...).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.log_parser import parse_log
from tools.safe_io import read_log
from tools.significance import (  # noqa: F401  (re-exported: tools.stats stays the import path)
    RECORD_ALPHA,
    RECORD_MARGIN_NATS,
    Sample,
    WelchResult,
    format_welch,
    mean_std,
    nats_to_bpb,
    record_margin_bpb,
    seeds_needed,
    tokens_per_byte,
    welch_one_sided,
)


def log_files(paths: list[Path]) -> list[Path]:
    """Files as given; folders expand to their *.log / *.txt files and those in a logs/ subfolder."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted({*p.glob("*.log"), *p.glob("*.txt"), *p.glob("logs/*.txt"), *p.glob("logs/*.log")})
            if not found:
                raise ValueError(f"{p}: no *.log or *.txt files in this folder")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    return out


def load_sample(paths: list[Path], stage: str | None, warn) -> Sample:
    """Final (or `stage`) val_bpb and val_loss of every log that has one; files without a score are reported."""
    labels, bpb, loss = [], [], []
    for f in log_files(paths):
        run = parse_log(read_log(f))
        ev = run["evals"].get(stage) if stage else (run["evals"].get(run["final_label"]) if run["final_label"] else None)
        if not ev or ev.get("val_bpb") is None or ev.get("val_loss") is None:
            warn(f"{f}: no {stage or 'final'} val_bpb/val_loss, skipped")
            continue
        labels.append(f"{f.name}" + (f" (seed {run['seed']})" if run["seed"] is not None else ""))
        bpb.append(float(ev["val_bpb"]))
        loss.append(float(ev["val_loss"]))
    return Sample(labels, bpb, loss)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="One-sided Welch t-test between two sets of logs (or folders of logs): "
                                             "does the candidate beat the reference by the record margin at p < 0.01?")
    ap.add_argument("--candidate", nargs="+", type=Path, required=True, help="candidate logs or folders")
    ap.add_argument("--reference", nargs="+", type=Path, required=True, help="reference (SOTA) logs or folders")
    ap.add_argument("--margin-nats", type=float, default=RECORD_MARGIN_NATS,
                    help=f"required improvement in nats per token (default {RECORD_MARGIN_NATS}, the challenge's rule)")
    ap.add_argument("--stage", help="eval label to compare (default: each log's final stage)")
    args = ap.parse_args(argv)
    warn = lambda msg: print(f"warning: {msg}", file=sys.stderr)
    try:
        cand = load_sample(args.candidate, args.stage, warn)
        ref = load_sample(args.reference, args.stage, warn)
        for name, s in (("candidate", cand), ("reference", ref)):
            if len(s.bpb) < 2:
                raise ValueError(f"the {name} needs scores from at least 2 logs, found {len(s.bpb)}")
        margin = record_margin_bpb(ref, args.margin_nats)
        result = welch_one_sided(cand.bpb, ref.bpb, margin)
    except (ValueError, OSError) as e:
        print(f"stats.py: error: {e}", file=sys.stderr)
        return 2
    for name, s in (("candidate", cand), ("reference", ref)):
        print(f"{name}: " + ", ".join(f"{lab} {v:.5f}" for lab, v in zip(s.labels, s.bpb)))
    tc, tr = cand.tokens_per_byte, ref.tokens_per_byte
    if abs(tc / tr - 1) > 0.01:
        print(f"note: tokens/byte differ (candidate {tc:.4f}, reference {tr:.4f}): different tokenizers; bpb is "
              "comparable, the nats margin is converted at the reference's tokens/byte")
    print(format_welch(result, args.margin_nats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
