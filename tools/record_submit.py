"""Stage a checked record folder as an openai/parameter-golf PR in a local clone: new branch, one commit, the PR
text. Never pushes (docs/records.md "Submitting").

Copied in the upstream layout: the packed train_gpt.py, the logs, submission.json, README.md (its "Included files"
section rewritten for what is copied) and requirements.txt; never the artifacts, and the readable twin only on
request. Only regular files are copied, read through safe_io (a symlink in the folder is refused, never followed).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

from tools.record_checks import Options, check_folder
from tools.record_docs import included_files_section
from tools.record_folder import TRACKS, load_folder
from tools.safe_io import MAX_LOG_BYTES, UnsafeFile, list_folder, read_bytes
from tools.verdicts import Row, format_rows

PLACEHOLDER_USER = ("pgolf submit", "pgolf-submit@localhost")
UNKNOWN = "unknown"


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
    """The names to copy; SubmitError for anything missing or not a regular file (symlinks are refused)."""
    kinds = {e.name: e.kind for e in list_folder(folder)}
    names = ["train_gpt.py", "submission.json", "README.md"]
    if "requirements.txt" in kinds:
        names.append("requirements.txt")
    if include_readable:
        names.append("train_gpt_readable.py")
    names += sorted(n for n in kinds if re.fullmatch(r"train_seed\d+\.log", n))
    bad = [f"{n} ({kinds.get(n, 'missing')})" for n in names if kinds.get(n) != "file"]
    if bad:
        raise SubmitError(f"{folder}: not regular files: {', '.join(bad)}")
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


def _check_repo(repo: Path, branch: str) -> None:
    if not repo.is_dir() or git(repo, "rev-parse", "--show-toplevel", check=False).stdout.strip() != str(repo.resolve()):
        raise SubmitError(f"--upstream-repo {repo}: not the top of a git clone")
    if git(repo, "status", "--porcelain").stdout.strip():
        raise SubmitError(f"{repo} has uncommitted changes; commit or stash them first")
    if not re.fullmatch(r"[A-Za-z0-9._/-]+", branch) or git(repo, "check-ref-format", "--branch", branch,
                                                           check=False).returncode:
        raise SubmitError(f"--branch {branch!r}: not a valid branch name")
    if git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}", check=False).returncode == 0:
        raise SubmitError(f"branch {branch} already exists in {repo}")


def submit(folder: Path, repo: Path, branch: str | None, include_readable: bool,
           opts: Options | None = None, say=print) -> tuple[str, str, str]:
    """Check, copy, commit on a new branch; returns (branch, PR title, PR body)."""
    rows: list[Row] = check_folder(folder, opts or Options())
    if any(r.status == "FAIL" for r in rows):
        say(format_rows(rows))
        raise SubmitError(f"{folder} fails tools/check_record.py; fix it before submitting")
    f = load_folder(folder)
    sub, track = f.claims.raw, f.claims.raw.get("track")
    if UNKNOWN in (sub.get("author", UNKNOWN), sub.get("github_id", UNKNOWN)):
        raise SubmitError("submission.json has no author/github_id; rebuild with --author and --github-id")
    if track not in TRACKS:
        raise SubmitError(f"submission.json track {track!r}: use one of {', '.join(TRACKS)}")
    branch = branch or f"record/{folder.resolve().name}"
    _check_repo(repo, branch)
    rel = Path("records") / f"track_{track}" / folder.resolve().name
    dest = repo / rel
    if dest.exists():
        raise SubmitError(f"{dest} already exists in the clone")
    files = files_to_copy(folder, include_readable)
    try:
        blobs = {name: read_bytes(folder / name, MAX_LOG_BYTES) for name in files}
    except UnsafeFile as e:
        raise SubmitError(str(e)) from None

    git(repo, "checkout", "-b", branch)
    dest.mkdir(parents=True)
    for name, data in blobs.items():
        if name == "README.md":
            text, section = data.decode("utf-8"), included_files_section(files)
            text, n = re.subn(r"## Included files\n.*?(?=\n## |\Z)", section.rstrip("\n"), text, flags=re.S)
            data = (text if n else text.rstrip("\n") + "\n\n" + section).encode("utf-8")
        (dest / name).write_bytes(data)
    title, body = pr_text(sub, {s: lf.parsed for s, lf in f.logs.items()}, files)
    name, email = git_user(repo)
    git(repo, "add", "--", str(rel))
    git(repo, "-c", f"user.name={name}", "-c", f"user.email={email}", "commit", "-q", "-m", title, "-m", body)
    return branch, title, body
