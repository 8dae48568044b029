"""Stage a record folder as an openai/parameter-golf PR: copy it into a local clone on a new branch, commit, and
print the PR title and body. Never pushes (open the PR yourself after reading the diff).

Usage: `python tools/submit.py FOLDER --upstream-repo PATH [--branch NAME] [--include-readable]`

The folder must pass tools/check_record.py first. Copied in the upstream layout: the packed train_gpt.py, the
train_seed<S>.log files, submission.json, README.md (its "Included files" section rewritten for what is copied)
and requirements.txt; never the artifacts (PRs do not carry them), and the readable twin only with
--include-readable. Destination: records/track_<track>/<folder name>/ (a PR adds exactly one folder).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tools.build_record import TRACKS, UNKNOWN, included_files_section
from tools.check_record import InputError, check_folder, format_rows, read_logs, read_submission

PLACEHOLDER_USER = ("pgolf submit", "pgolf-submit@localhost")


class SubmitError(Exception):
    """A one-line reason to refuse."""


def git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise SubmitError(f"git {' '.join(args)} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    return proc


def git_user(repo: Path) -> tuple[str, str]:
    """Committer identity: GIT_AUTHOR_NAME/EMAIL, else the repo's git config, else a placeholder."""
    out = []
    for env, key, fallback in (("GIT_AUTHOR_NAME", "user.name", PLACEHOLDER_USER[0]),
                               ("GIT_AUTHOR_EMAIL", "user.email", PLACEHOLDER_USER[1])):
        value = os.environ.get(env) or git(repo, "config", key, check=False).stdout.strip()
        out.append(value or fallback)
    return out[0], out[1]


def files_to_copy(folder: Path, include_readable: bool) -> list[str]:
    names = ["train_gpt.py", "submission.json", "README.md"]
    if (folder / "requirements.txt").is_file():
        names.append("requirements.txt")
    if include_readable:
        if not (folder / "train_gpt_readable.py").is_file():
            raise SubmitError(f"--include-readable: {folder}/train_gpt_readable.py does not exist")
        names.append("train_gpt_readable.py")
    names += sorted(p.name for p in folder.glob("train_seed*.log"))
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise SubmitError(f"{folder}: missing {', '.join(missing)}")
    return names


def pr_text(sub: dict[str, Any], logs: dict[int, dict[str, Any]], files: list[str]) -> tuple[str, str]:
    """(title, body) of the PR, from submission.json and the logs."""
    kind = "Record" if sub.get("track") == "10min_16mb" else "Non-record"
    n = len(sub.get("seeds", []))
    title = f"{kind}: {sub.get('name')} (val_bpb {sub.get('val_bpb'):.4f}, {n}-seed mean)"
    std = sub.get("val_bpb_std")
    lines = [f"**val_bpb = {sub.get('val_bpb'):.4f}** ({n}-seed mean" + (f", std {std:.4f}" if std is not None else "")
             + f") | max code + artifact {sub.get('bytes_total', 0):,} bytes | {sub.get('hardware')}", "",
             str(sub.get("blurb", "")), "", "| Seed | val_bpb | Steps | Artifact bytes | Train s | Eval s |",
             "|---:|---:|---:|---:|---:|---:|"]
    for seed in sub.get("seeds", []):
        r = sub.get("seed_results", {}).get(str(seed), {})
        log = logs.get(seed, {})
        t = log.get("time_totals") or {}
        lines.append(f"| {seed} | {r.get('val_bpb', log.get('final_val_bpb'))} | {r.get('steps', log.get('steps'))} | "
                     f"{r.get('artifact_bytes', 0):,} | {t.get('train', '-')} | {t.get('eval', '-')} |")
    lines += ["", "Compliance (issue #1017 C1-C4; checked by tools/check_record.py from the files in this PR):", ""]
    lines += [f"- [{'x' if v else ' '}] {k}" + ("" if v is not None else " (n/a)")
              for k, v in (sub.get("compliance") or {}).items()]
    seed0 = (sub.get("seeds") or [42])[0]
    lines += ["", "Reproduce:", "", "```bash", f"SEED={seed0} torchrun --standalone --nproc_per_node=8 train_gpt.py",
              "```", "", "Files: " + ", ".join(f"`{f}`" for f in files)]
    return title, "\n".join(lines)


def submit(folder: Path, repo: Path, branch: str | None, include_readable: bool) -> tuple[str, str, str]:
    """Check, copy, commit on a new branch; returns (branch, PR title, PR body)."""
    rows = check_folder(folder)
    if any(r.status == "FAIL" for r in rows):
        print(format_rows(rows))
        raise SubmitError(f"{folder} fails tools/check_record.py; fix it before submitting")
    sub = read_submission(folder)
    track = sub.get("track")
    if UNKNOWN in (sub.get("author", UNKNOWN), sub.get("github_id", UNKNOWN)):
        raise SubmitError("submission.json has no author/github_id; rebuild with --author and --github-id")
    if track not in TRACKS:
        raise SubmitError(f"submission.json track {track!r}: use one of {', '.join(TRACKS)}")
    if not repo.is_dir() or git(repo, "rev-parse", "--show-toplevel", check=False).stdout.strip() != str(repo.resolve()):
        raise SubmitError(f"--upstream-repo {repo}: not the top of a git clone")
    if git(repo, "status", "--porcelain").stdout.strip():
        raise SubmitError(f"{repo} has uncommitted changes; commit or stash them first")
    branch = branch or f"record/{folder.resolve().name}"
    if not re.fullmatch(r"[A-Za-z0-9._/-]+", branch) or git(repo, "check-ref-format", "--branch", branch,
                                                           check=False).returncode:
        raise SubmitError(f"--branch {branch!r}: not a valid branch name")
    if git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False).returncode == 0:
        raise SubmitError(f"branch {branch} already exists in {repo}")
    rel = Path("records") / f"track_{track}" / folder.resolve().name
    dest = repo / rel
    if dest.exists():
        raise SubmitError(f"{dest} already exists in the clone")
    files = files_to_copy(folder, include_readable)

    git(repo, "checkout", "-b", branch)
    dest.mkdir(parents=True)
    for name in files:
        if name == "README.md":
            text = (folder / name).read_text(encoding="utf-8")
            section = included_files_section(files)
            text, n = re.subn(r"## Included files\n.*?(?=\n## |\Z)", section.rstrip("\n"), text, flags=re.S)
            (dest / name).write_text(text if n else text.rstrip("\n") + "\n\n" + section, encoding="utf-8")
        else:
            shutil.copyfile(folder / name, dest / name)
    title, body = pr_text(sub, read_logs(folder), files)
    name, email = git_user(repo)
    git(repo, "add", "--", str(rel))
    git(repo, "-c", f"user.name={name}", "-c", f"user.email={email}", "commit", "-q", "-m", title, "-m", body)
    return branch, title, body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Copy a checked record folder into a local openai/parameter-golf clone on "
                                             "a new branch, commit it, and print the PR text (never pushes).")
    ap.add_argument("folder", type=Path, help="record folder built by tools/build_record.py")
    ap.add_argument("--upstream-repo", type=Path, required=True, help="path to a local clone of openai/parameter-golf")
    ap.add_argument("--branch", default=None, help="new branch name (default: record/<folder name>)")
    ap.add_argument("--include-readable", action="store_true",
                    help="also submit train_gpt_readable.py (upstream records rarely carry a readable twin)")
    args = ap.parse_args(argv)
    try:
        branch, title, body = submit(args.folder, args.upstream_repo, args.branch, args.include_readable)
    except InputError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 2
    except SubmitError as e:
        print(f"submit.py: error: {e}", file=sys.stderr)
        return 1
    print(f"committed on branch {branch} of {args.upstream_repo} (not pushed)\n\nPR title:\n{title}\n\nPR body:\n{body}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
