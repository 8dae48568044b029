"""Build a record folder from finished runs (docs/records.md): the packed train_gpt.py that is counted, its readable
twin, the logs, the artifacts, submission.json and a generated README.md.

The code comes from the runs' logs (every log starts with the byte-exact frames of the files that ran), never from
the working tree: all seeds must have run identical code. data/shards.py and quant/ are inlined, the result packed
(record_pack), the packed file scanned statically and then run on a tiny CPU config inside the sandbox (record_smoke;
skipped with a warning where no sandbox exists: the code is never run unsandboxed). Only then are bytes counted and
the folder written, atomically (built beside the target, then renamed into place).

An experiment run (experiments/<name>.py, the entry script) packs the same way: the entry is appended to the inlined
train_gpt.py (record_pack), the smoke run gets the run's own values of the experiment's added Config fields and must
log them, and submission.json / README.md name the entry (docs/records.md "Packing experiments").
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tools import sandbox
from tools.record_docs import readme, submission
from tools.record_folder import TRACKS
from tools.record_pack import RecordError, check_equivalent, entry_script, inline_modules, pack
from tools.record_runs import (
    Run,
    common_sources,
    config_defaults,
    config_overrides,
    experiment_config,
    hardware,
    load_run,
    run_from_dir,
    smoke_env_of,
)
from tools.record_smoke import smoke_run
from tools.records_index import update_index
from tools.script_scan import scan_script
from train_gpt import ARTIFACT_LIMIT_BYTES

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "records"
UNKNOWN = "unknown"  # author / github_id placeholder for local builds (tools/dryrun.py)


@dataclass
class BuildOptions:
    name: str
    track: str
    run: list[Path] = field(default_factory=list)
    log: list[Path] = field(default_factory=list)
    artifact: list[Path] = field(default_factory=list)
    author: str = UNKNOWN
    github_id: str = UNKNOWN
    blurb: str = ""
    date: str = field(default_factory=lambda: dt.date.today().isoformat())
    out: Path | None = None
    upstream: bool = False
    smoke_env: list[str] = field(default_factory=list)  # KEY=VALUE settings of the smoke run (an experiment's sizes)


def slug(name: str) -> str:
    """CamelCase slug of a record name: "SP8192 legal-TTT qk5" -> "SP8192LegalTTTQk5"."""
    words = re.findall(r"[A-Za-z0-9]+", name)
    if not words:
        raise RecordError(f"--name {name!r} has no letters or digits to make a folder name from")
    return "".join(w[0].upper() + w[1:] for w in words)


def default_out(track: str, date: str, name: str) -> Path:
    return RECORDS / f"track_{track}" / f"{date}_{slug(name)}"


def write_folder(out: Path, texts: dict[str, str], copies: dict[str, Path]) -> None:
    """Write every file into a temporary sibling directory, then rename it to `out` (all or nothing)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for name, src in copies.items():
            shutil.copyfile(src, tmp / name)
        os.chmod(tmp, 0o755)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _validate(opts: BuildOptions) -> list[tuple[Path, Path]]:
    if opts.track not in TRACKS:
        raise RecordError(f"--track {opts.track}: use one of {', '.join(TRACKS)}")
    if len(opts.log) != len(opts.artifact):
        raise RecordError(f"--log and --artifact come in pairs: got {len(opts.log)} logs, {len(opts.artifact)} artifacts")
    pairs = [run_from_dir(d) for d in opts.run] + list(zip(opts.log, opts.artifact))
    if not pairs:
        raise RecordError("no runs: pass --run OUT_DIR or --log LOG --artifact ARTIFACT (one per seed)")
    try:
        dt.date.fromisoformat(opts.date)
    except ValueError:
        raise RecordError(f"--date {opts.date!r}: use YYYY-MM-DD") from None
    return pairs


def _smoke_settings(opts: BuildOptions, run: Run, fields: set[str], added: list[str]) -> dict:
    """smoke_run's keywords beyond the packed file: an experiment's added fields at the run's own values (it must
    log them), then --smoke-env; {} for a plain train_gpt.py record without --smoke-env."""
    if not added and not opts.smoke_env:
        return {}
    env = smoke_env_of(run, added)
    for item in opts.smoke_env:
        key, sep, value = item.partition("=")
        if not sep or key.lower() not in fields:
            raise RecordError(f"--smoke-env {item!r}: use KEY=VALUE with KEY a Config field of this record")
        env[key.upper()] = value
    return dict(extra_env=env, expect_fields=tuple(added))


def build(opts: BuildOptions, say=print) -> Path:
    pairs = _validate(opts)
    out = opts.out or default_out(opts.track, opts.date, opts.name)
    if out.exists():
        raise RecordError(f"{out} already exists; remove it or pass another --out")
    runs = [load_run(log, art) for log, art in pairs]
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        raise RecordError(f"duplicate seeds among the runs: {seeds}")
    hw, is_8xh100 = hardware(runs)
    if opts.track == "10min_16mb" and not is_8xh100:
        raise RecordError(f"track 10min_16mb needs 8xH100 logs; these ran on {hw}: use --track non_record_16mb")

    sources = common_sources(runs)
    changed = sorted(n for n, s in sources.items() if not (ROOT / n).is_file() or (ROOT / n).read_text() != s)
    if changed:
        say(f"note: the working tree differs from the logged sources in {', '.join(changed)}; "
            f"the record is built from the logs (the code that ran)")
    readable = inline_modules(sources)
    entry = entry_script(sources)
    if entry:
        say(f"entry: {entry} (appended to train_gpt.py and its inlined modules; the packed file runs it)")
    packed = pack(readable)
    check_equivalent(readable, packed)
    size, readable_size = len(packed.encode("utf-8")), len(readable.encode("utf-8"))
    say(f"code: readable {readable_size:,} bytes -> packed {size:,} bytes (AST-equivalent)")
    for f in scan_script(packed).findings:  # what the code can do, before anything of it runs
        if f.kind != "info":
            say(f"warning: line {f.line} of the packed source: {f.what} ({f.kind}); the sandboxed run decides")
    defaults = config_defaults(readable)
    added, experiment_defaults = experiment_config(readable) if entry else ([], {})
    smoke_kw = _smoke_settings(opts, runs[0], set(defaults) | set(added), added)
    if (why := sandbox.sandbox_status()) is not None:  # never run code from a log unsandboxed
        say(f"warning: smoke run skipped, the packed file was not executed: {why}")
    else:
        with tempfile.TemporaryDirectory(prefix="pgolf_smoke_") as work:
            smoke = smoke_run(packed, Path(work), set(defaults), **smoke_kw)
        say(f"smoke run of the packed file (sandboxed: {', '.join(smoke.observation.observers)}): "
            f"{smoke.seconds:.1f} s, bytes_code:{smoke.bytes_code} bytes_model:{smoke.bytes_model} "
            f"val_bpb:{smoke.val_bpb:.4f}")

    overrides = config_overrides(runs, {**defaults, **experiment_defaults})
    sub = submission(runs, opts, size, hw, entry)
    texts = {"train_gpt.py": packed}
    copies: dict[str, Path] = {}
    if not opts.upstream:
        texts["train_gpt_readable.py"] = readable
    for r in runs:
        copies[f"train_seed{r.seed}.log"] = r.log_path
        if not opts.upstream:
            copies[f"final_model_seed{r.seed}.int6.ptz"] = r.artifact_path
    texts["submission.json"] = json.dumps(sub, indent=2) + "\n"
    texts["requirements.txt"] = (ROOT / "requirements.txt").read_text()
    files = ["README.md", *texts, *copies]
    world_size = runs[0].parsed["world_size"] or 8
    texts["README.md"] = readme(sub, runs, overrides, files, readable_size, world_size, entry)
    write_folder(out, texts, copies)
    if out.resolve().is_relative_to(RECORDS.resolve()):
        update_index(RECORDS)
    worst = max(size + r.artifact_bytes for r in runs)
    say(f"wrote {out}: {len(runs)} seeds, val_bpb {sub['val_bpb']:.8f}, max bytes {worst:,} / {ARTIFACT_LIMIT_BYTES:,}")
    if overrides:
        say(f"note: the runs overrode Config defaults ({', '.join(overrides)}); the README lists them")
    return out
