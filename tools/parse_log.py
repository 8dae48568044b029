"""Parse training logs (ours, upstream records, the root baseline) to JSON, one object per log per line.

Usage: `python tools/parse_log.py LOG [LOG...] [--no-curves] [--final LABEL]`

The parsing lives in tools/log_parser.py (line kinds in tools/log_lines.py; formats in docs/log_format.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tools.log_parser import json_safe, parse_log, select_final
from tools.safe_io import UnsafeFile, read_log

__all__ = ["main", "parse_log", "read_log"]  # parse_log/read_log re-exported for older callers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Parse training logs (ours, upstream records, root baseline) to JSON.")
    ap.add_argument("logs", nargs="+", type=Path, help="log files (logs/<RUN_ID>.txt, train_seed42.log, ...)")
    ap.add_argument("--no-curves", action="store_true", help="omit the per-step train/val curves from the output")
    ap.add_argument("--final", default=None, metavar="LABEL",
                    help="the submitted score's label (default: the last score line that scores the artifact)")
    args = ap.parse_args(argv)
    try:
        texts = [read_log(p) for p in args.logs]
    except UnsafeFile as e:
        print(f"parse_log.py: error: {e}", file=sys.stderr)
        return 2
    for path, text in zip(args.logs, texts, strict=True):
        parsed = parse_log(text)
        if parsed["format"] is None:
            print(f"warning: {path}: no recognizable log lines", file=sys.stderr)
        if args.final:
            label, _ = select_final(parsed, declared=args.final)
            if label != args.final and parsed["evals"].get(label, {}).get("name") != args.final:
                print(f"warning: {path}: no score line labelled {args.final!r}", file=sys.stderr)
            else:
                ev = parsed["evals"][label]
                parsed.update(final_label=label, final_val_loss=ev["val_loss"], final_val_bpb=ev["val_bpb"])
        if args.no_curves:
            del parsed["train"], parsed["val"]
        parsed["sources"] = {name: len(src.encode("utf-8")) for name, src in parsed["sources"].items()}  # not the text
        print(json.dumps(json_safe({"log": str(path), **parsed})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
