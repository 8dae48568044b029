"""Check a record folder from the bytes on disk, in any upstream layout: size (every byte of code that runs), time
budgets, the artifact against its log, the score against the logs, the tokenizer, what the script can do (static
scan) and what it does (a tiny CPU run in the bubblewrap sandbox), and optionally significance vs a reference.

Usage: `python tools/check_record.py FOLDER [FOLDER...] [--against REF] [--alpha 0.01] [--no-run] [--dataset DIR]`

Each check is PASS, INFO, WARN or FAIL (docs/rules.md says which rule each enforces and why); exit 1 when anything
FAILs, 2 on input that cannot be judged at all. The work is done by tools/record_checks.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.record_checks import Options, check_folder
from tools.record_folder import FolderError
from tools.verdicts import format_rows, verdict


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Check record folders: size, time, artifact, score vs logs, tokenizer, "
                                             "script capabilities and a sandboxed run; significance with --against.")
    ap.add_argument("folders", nargs="+", type=Path, help="record folder(s) (train_gpt.py, logs, submission.json)")
    ap.add_argument("--against", type=Path, default=None,
                    help="reference record folder (its logs or submission.json seed results) for the Welch test")
    ap.add_argument("--alpha", type=float, default=0.01, help="significance level of the one-sided test (default 0.01)")
    ap.add_argument("--no-run", action="store_true", help="skip the sandboxed run (reported as WARN: not run)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds for the sandboxed run (default 600)")
    ap.add_argument("--dataset", type=Path, default=None,
                    help="dataset dir whose manifest.json tokenizer_sha256 the logs must match")
    args = ap.parse_args(argv)
    if not 0 < args.alpha < 1:
        print(f"check_record.py: error: --alpha {args.alpha}: must be in (0, 1)", file=sys.stderr)
        return 2
    opts = Options(args.against, args.alpha, not args.no_run, args.timeout, args.dataset)
    status = 0
    for folder in args.folders:
        try:
            rows = check_folder(folder, opts)
        except FolderError as e:
            print(f"check_record.py: error: {e}", file=sys.stderr)
            status = max(status, 2)
            continue
        except Exception as e:  # a checker bug must not hide the other folders' verdicts; say which input hit it
            print(f"check_record.py: error: {folder}: internal error {type(e).__name__}: {e}", file=sys.stderr)
            status = max(status, 2)
            continue
        if len(args.folders) > 1:
            print(f"== {folder}")
        print(format_rows(rows))
        status = max(status, 1 if verdict(rows) == "FAIL" else 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
