"""A record folder as the checker sees it, in any layout seen upstream (docs/rules.md "Folder layouts").

* logs: any `*.log` / `*.txt` that parses as a training log, at the top or one folder down (`train_seed42.log`,
  `train.log`, `logs/<uuid>.txt`, `seed1337.txt`, ...); the seed comes from the file name, else from the log;
* submission.json: `seeds` as a list or a dict; per-seed values under `seed_results`, `seed_scores`, `results` or
  `per_seed` (numbers or objects); a missing `track` is taken from the folder path;
* the script: `train_gpt.py`, else the one `train_gpt*.py` when there is exactly one (`train_gpt_v5.py`; the name is a
  metadata defect), else none: the checker reports the missing script as a violation and judges the rest;
* artifacts: `final_model_seed<S>.*.ptz` (ours), else none (upstream PRs carry none);
* nothing is followed or read that is not a regular file (safe_io).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.log_parser import parse_log
from tools.safe_io import MAX_JSON_BYTES, MAX_SCRIPT_BYTES, Entry, UnsafeFile, list_folder, read_bytes, read_log

TRACKS = ("10min_16mb", "non_record_16mb")
SEED_IN_NAME = re.compile(r"seed[_-]?(\d+)", re.I)
ARTIFACT = re.compile(r"final_model_seed(\d+)\..*ptz")
SCRIPT = "train_gpt.py"
SCRIPT_VARIANT = re.compile(r"train_gpt.*\.py")
LOG_SUFFIX = re.compile(r"\.(log|txt)$")
NOT_LOGS = re.compile(r"^(requirements.*|readme.*|license.*|notes?.*)\.txt$", re.I)
PER_SEED_KEYS = ("seed_results", "seed_scores", "results", "per_seed")
CLAIM_KEYS = {"val_bpb": ("val_bpb", "bpb", "score"), "val_loss": ("val_loss", "loss"),
              "artifact_bytes": ("artifact_bytes", "bytes_total", "total_bytes", "bytes"), "steps": ("steps",)}


class FolderError(Exception):
    """The folder cannot be judged at all (not a directory, no readable submission.json): exit status 2."""


@dataclass
class Claims:
    """What submission.json says, normalized."""
    raw: dict[str, Any]
    track: str
    track_source: str
    seeds: list[int] | None
    per_seed: dict[int, dict[str, Any]]
    problems: list[str] = field(default_factory=list)  # metadata oddities (WARN)

    def get(self, key: str) -> Any:
        return self.raw.get(key)


@dataclass
class LogFile:
    name: str
    seed: int | None
    parsed: dict[str, Any]


@dataclass
class Folder:
    path: Path
    entries: list[Entry]
    unsafe: list[str]  # entries not read, with why
    script: bytes  # empty when script_name is None
    claims: Claims
    logs: dict[int, LogFile]  # by seed
    log_problems: list[str]
    artifacts: dict[int, Path]
    script_name: str | None = SCRIPT  # the file judged as the record's script; None when there is none
    script_problem: str | None = None  # why there is none, or why a variant was judged instead of train_gpt.py

    def sibling_names(self) -> set[str]:
        return {e.name for e in self.entries if e.kind in ("file", "dir") and e.name != self.script_name}

    def code_files(self) -> dict[str, bytes]:
        """Regular files beside the script small enough to be code (what a sandboxed run gets copied)."""
        out = {}
        for e in self.entries:
            if e.kind == "file" and e.size <= MAX_SCRIPT_BYTES and not ARTIFACT.fullmatch(e.name):
                try:
                    out[e.name] = read_bytes(self.path / e.name, MAX_SCRIPT_BYTES)
                except UnsafeFile:
                    continue
        return out


def _as_int(x: Any) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, str) and x.strip().lstrip("-").isdigit():
        return int(x)
    return None


def _claim(value: Any) -> dict[str, Any]:
    """One seed's claims from a number (its bpb) or an object with any of the known key spellings."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"val_bpb": float(value)}
    if not isinstance(value, dict):
        return {}
    out = {}
    for key, spellings in CLAIM_KEYS.items():
        for s in spellings:
            if isinstance(value.get(s), int | float) and not isinstance(value.get(s), bool):
                out[key] = value[s]
                break
    return out


def track_of(raw: dict[str, Any], path: Path) -> tuple[str, str]:
    t = str(raw.get("track") or "").lower().replace("-", "_").removeprefix("track_")
    if t in TRACKS:
        return t, "submission.json"
    if "non_record" in t or "unlimited" in t:
        return "non_record_16mb", "submission.json"
    for part in reversed(path.resolve().parts):
        if part.startswith("track_") and part.removeprefix("track_") in TRACKS:
            return part.removeprefix("track_"), "folder path"
    return "10min_16mb", "default (no track in submission.json or the path)"


def normalize_submission(raw: dict[str, Any], path: Path) -> Claims:
    track, source = track_of(raw, path)
    claims = Claims(raw, track, source, None, {})
    seeds = raw.get("seeds")
    if isinstance(seeds, dict):
        claims.seeds = [s for s in map(_as_int, seeds) if s is not None]
        for k, v in seeds.items():
            if (s := _as_int(k)) is not None and _claim(v):
                claims.per_seed.setdefault(s, {}).update(_claim(v))
    elif isinstance(seeds, list):
        ints = [_as_int(s) for s in seeds]
        claims.seeds = [s for s in ints if s is not None]
        if None in ints:
            claims.problems.append(f"seeds {seeds!r}: not all integers")
    elif seeds is not None:
        claims.problems.append(f"seeds {seeds!r}: neither a list nor a dict")
    for key in PER_SEED_KEYS:
        block = raw.get(key)
        items = block.items() if isinstance(block, dict) else (
            [(d.get("seed"), d) for d in block if isinstance(d, dict)] if isinstance(block, list) else [])
        for k, v in items:
            if (s := _as_int(k)) is not None and _claim(v):
                claims.per_seed.setdefault(s, {}).update(_claim(v))
    if claims.seeds is None and claims.per_seed:
        claims.seeds = sorted(claims.per_seed)
    return claims


def read_submission(folder: Path) -> Claims:
    path = folder / "submission.json"
    try:
        raw = json.loads(read_bytes(path, MAX_JSON_BYTES).decode("utf-8"))
    except UnsafeFile as e:
        raise FolderError(str(e)) from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FolderError(f"{path}: unreadable ({e})") from None
    if not isinstance(raw, dict):
        raise FolderError(f"{path}: not a JSON object")
    return normalize_submission(raw, folder)


def _log_candidates(folder: Path, entries: list[Entry]) -> list[str]:
    names = [e.name for e in entries if e.kind == "file" and LOG_SUFFIX.search(e.name) and not NOT_LOGS.match(e.name)]
    for e in entries:
        if e.kind == "dir" and not e.name.startswith("."):
            try:
                sub = list_folder(folder / e.name)
            except OSError:
                continue
            names += [f"{e.name}/{s.name}" for s in sub if s.kind == "file" and LOG_SUFFIX.search(s.name)
                      and not NOT_LOGS.match(s.name)]
    # train_seed<S>.log first: when two files hold the same seed, the conventional one is used
    return sorted(names, key=lambda n: (not n.startswith("train_seed"), "/" in n, n))


def read_logs(folder: Path, entries: list[Entry] | None = None) -> tuple[dict[int, LogFile], list[str]]:
    """Every training log in the folder by seed, and the problems met (unreadable, duplicate, no seed)."""
    entries = list_folder(folder) if entries is None else entries
    logs: dict[int, LogFile] = {}
    problems: list[str] = []
    unseeded: list[LogFile] = []
    for name in _log_candidates(folder, entries):
        try:
            parsed = parse_log(read_log(folder / name))
        except UnsafeFile as e:
            problems.append(str(e))
            continue
        if parsed["format"] is None or not (parsed["evals"] or parsed["train"]):
            continue
        m = SEED_IN_NAME.search(Path(name).name)
        seed = int(m[1]) if m else parsed["seed"]
        if m and parsed["seed"] is not None and parsed["seed"] != seed:
            problems.append(f"{name}: the file name says seed {seed}, the log says {parsed['seed']}")
        log = LogFile(name, seed, parsed)
        if seed is None:
            unseeded.append(log)
        elif seed in logs:
            if logs[seed].parsed["final_val_bpb"] != parsed["final_val_bpb"]:
                problems.append(f"{name}: a second log for seed {seed} with another score (used {logs[seed].name})")
        else:
            logs[seed] = log
    for i, log in enumerate(unseeded):  # a single unseeded log (the baseline's train.log) gets a placeholder seed
        key = -1 - i
        logs[key] = log
        problems.append(f"{log.name}: no seed in its name or its lines")
    return logs, problems


def load_folder(folder: Path) -> Folder:
    if not folder.is_dir():
        raise FolderError(f"{folder}: not a directory")
    entries = list_folder(folder)
    unsafe = [f"{e.name}: {e.kind}, not followed or read" for e in entries if e.kind not in ("file", "dir")]
    name, problem = find_script(entries)
    script = b""
    if name is not None:
        try:
            script = read_bytes(folder / name, MAX_SCRIPT_BYTES)
        except UnsafeFile as e:
            name, problem = None, f"required file unreadable: {e}"
    claims = read_submission(folder)
    logs, problems = read_logs(folder, entries)
    artifacts = {int(m[1]): folder / e.name for e in entries if e.kind == "file" and (m := ARTIFACT.fullmatch(e.name))}
    return Folder(folder, entries, unsafe, script, claims, logs, problems, artifacts, name, problem)


def find_script(entries: list[Entry]) -> tuple[str | None, str | None]:
    """(name, problem): train_gpt.py; else the single train_gpt*.py, with a note; else None and why."""
    if any(e.name == SCRIPT for e in entries):
        return SCRIPT, None
    variants = sorted(e.name for e in entries if e.kind == "file" and SCRIPT_VARIANT.fullmatch(e.name))
    if len(variants) == 1:
        return variants[0], f"{variants[0]} judged as the record's script (the folder has no {SCRIPT})"
    more = f" ({len(variants)} candidates: {', '.join(variants)}; none judged)" if variants else ""
    return None, f"required file missing: {SCRIPT}{more}"
