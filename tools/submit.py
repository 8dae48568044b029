"""Stage a record folder as an openai/parameter-golf PR: copy it into a local clone on a new branch, commit, and
print the PR title and body. Never pushes (open the PR yourself after reading the diff).

Usage: `python tools/submit.py FOLDER --upstream-repo PATH [--branch NAME] [--include-readable] [--no-run]`

The folder must pass tools/check_record.py first (no FAIL). The work is done by tools/record_submit.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tools.record_checks import Options
from tools.record_folder import FolderError
from tools.record_submit import SubmitError, submit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Copy a checked record folder into a local openai/parameter-golf clone on "
                                             "a new branch, commit it, and print the PR text (never pushes).")
    ap.add_argument("folder", type=Path, help="record folder built by tools/build_record.py")
    ap.add_argument("--upstream-repo", type=Path, required=True, help="path to a local clone of openai/parameter-golf")
    ap.add_argument("--branch", default=None, help="new branch name (default: record/<folder name>)")
    ap.add_argument("--include-readable", action="store_true",
                    help="also submit train_gpt_readable.py (upstream records rarely carry a readable twin)")
    ap.add_argument("--no-run", action="store_true", help="check without the sandboxed run (reported as WARN)")
    args = ap.parse_args(argv)
    try:
        branch, title, body = submit(args.folder, args.upstream_repo, args.branch, args.include_readable,
                                     Options(run=not args.no_run))
    except FolderError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    except SubmitError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 1
    print(f"committed on branch {branch} of {args.upstream_repo} (not pushed)\n\nPR title:\n{title}\n\nPR body:\n{body}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
