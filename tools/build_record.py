"""Build a record folder (packed + readable train_gpt.py, logs, artifacts, submission.json, README.md) from runs.

Usage:
  python tools/build_record.py --run runs/s42 --run runs/s314 --run runs/s999 --name "SP8192 QK5 legal TTT" \\
      --track 10min_16mb --author "Jane Doe" --github-id jdoe [--out DIR] [--upstream] [--blurb TEXT] [--date D]

The default output is records/track_<track>/<date>_<Slug>/ (records/README.md's table is regenerated). The work is
done by tools/record_build.py (packing in record_pack, the sandboxed smoke run in record_smoke).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from tools.record_build import UNKNOWN, BuildOptions, build
from tools.record_folder import TRACKS
from tools.record_pack import RecordError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build a record folder (packed + readable train_gpt.py, logs, artifacts, "
                                             "submission.json, README.md) from finished runs.")
    ap.add_argument("--run", type=Path, action="append", default=[],
                    help="a run's OUT_DIR (logs/<RUN_ID>.txt, final_model.int6.ptz, run_summary.json); once per seed")
    ap.add_argument("--log", type=Path, action="append", default=[], help="a run's log file (pair with --artifact)")
    ap.add_argument("--artifact", type=Path, action="append", default=[], help="that run's final_model.int6.ptz")
    ap.add_argument("--name", required=True, help="the record's name (title; the folder slug is its CamelCase)")
    ap.add_argument("--track", required=True, choices=TRACKS, help="10min_16mb (8xH100 record) or non_record_16mb")
    ap.add_argument("--author", default=UNKNOWN, help=f"author's name for submission.json (default {UNKNOWN!r}; "
                    f"tools/submit.py refuses it)")
    ap.add_argument("--github-id", default=UNKNOWN, help=f"author's GitHub id for submission.json (default {UNKNOWN!r})")
    ap.add_argument("--blurb", default="", help="one-paragraph summary (default: the name)")
    ap.add_argument("--date", default=dt.date.today().isoformat(), help="record date YYYY-MM-DD (default: today)")
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default: records/track_<track>/<date>_<Slug>/); must not exist")
    ap.add_argument("--upstream", action="store_true",
                    help="upstream PR layout: no readable twin and no artifacts in the folder")
    ap.add_argument("--smoke-env", action="append", default=[], metavar="KEY=VALUE",
                    help="a Config field for the smoke run only (repeatable), e.g. an experiment's size")
    args = ap.parse_args(argv)
    try:
        build(BuildOptions(**vars(args)))
    except RecordError as e:
        print(f"build_record.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
