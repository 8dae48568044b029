"""The referee: judge a record folder from the bytes on disk (docs/rules.md has every rule, tolerance and why).

`check_folder` is a list of independent checks, each returning verdict rows:
inputs (what was not read) -> script (static capabilities) -> sandbox run (what it does) -> code bytes -> per seed:
size, time, artifact, code vs log, hardware -> score (claims vs logs) -> tokenizer -> metadata -> significance.
"""

from __future__ import annotations

import functools
import hashlib
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.log_lines import submittable
from tools.log_parser import select_final
from tools.record_folder import SCRIPT, Folder, FolderError, LogFile, load_folder
from tools.record_pack import RecordError, inline_modules, normalized_dump
from tools.safe_io import MAX_ARTIFACT_BYTES, MAX_JSON_BYTES, MAX_SCRIPT_BYTES, UnsafeFile, read_bytes
from tools.sandbox import Observation
from tools.script_scan import ALLOWED_EXECUTABLES, Scan, scan_script
from tools.stats import RECORD_MARGIN_NATS, nats_to_bpb, seeds_needed, tokens_per_byte, welch_one_sided
from tools.verdicts import Row, passes
from train_gpt import ARTIFACT_LIMIT_BYTES, TIME_LIMIT_SECONDS

# A reported score may be better than its log by at most this much (bpb). Upstream JSONs print 4-8 decimals of
# numbers the logs print with 8; 1e-4 is a twentieth of the smallest record margin (0.005 nats ~ 0.0019 bpb at
# sp8192) and still accepts a 4-decimal rounding of the exact value.
SCORE_TOLERANCE_BPB = 1e-4
CAP = f"<= {ARTIFACT_LIMIT_BYTES:,}"
TLIM = f"<= {TIME_LIMIT_SECONDS:.0f} s"


@dataclass(frozen=True)
class Options:
    against: Path | None = None
    alpha: float = 0.01
    run: bool = True  # the sandboxed run (WARN "not run" when off or unavailable)
    timeout: float = 600.0
    dataset: Path | None = None  # a dataset dir whose manifest.json's tokenizer_sha256 the logs must match


# -----------------------------------------------------------------------------------------------------------------
# inputs and the script
# -----------------------------------------------------------------------------------------------------------------

def check_inputs(f: Folder) -> list[Row]:
    rows = [Row("input", "", u, "regular files only", "WARN") for u in f.unsafe]
    rows += [Row("logs", "", p, "", "WARN") for p in f.log_problems]
    rows += [Row("submission.json", "", p, "", "WARN") for p in f.claims.problems]
    rows.append(Row("track", "", f"{f.claims.track} (from {f.claims.track_source})", "", "INFO"))
    if f.claims.track_source.startswith("default"):
        rows[-1] = Row("track", "", f"{f.claims.track} ({f.claims.track_source})", "", "WARN")
    return rows


def check_script(scan: Scan, size: int) -> list[Row]:
    decoded = scan.inner is not None and scan.wrapper.endswith("exec wrapper")
    inner = f" -> {len(scan.inner.encode()):,} bytes decoded" if decoded else ""
    rows = [Row("script", "", f"{scan.wrapper}, {size:,} bytes{inner}, parsed by {scan.parsed_with}", "", "INFO")]
    if scan.parse_error:
        rows.append(Row("script parse", "", scan.parse_error, "", "INFO" if scan.parsed_with != "tokens" else "WARN"))
    for x in scan.findings:
        where = f"line {x.line}: " if x.line else ""
        rows.append(Row(f"can: {x.kind}", "", f"{where}{x.what}", "described; the sandbox decides",
                        "INFO" if x.kind == "info" else "WARN"))
    if not any(x.kind != "info" for x in scan.findings):
        rows.append(Row("script capabilities", "", "no network, process, dynamic-code or native-code use found",
                        "static AST walk", "PASS"))
    return rows


def check_observation(obs: Observation | None) -> list[Row]:
    """Verdicts on what the sandboxed run did (docs/rules.md "The sandbox run"). A run that stopped before any of
    the record's own functions ran (a SyntaxError, a failing import at the top) observed nothing: WARN, no PASS."""
    if obs is None or not obs.ran:
        why = "--no-run" if obs is None else obs.reason
        return [Row("sandbox run", "", f"not run: {why}", "dynamic check", "WARN")]
    end = "timed out" if obs.timed_out else f"exit {obs.returncode}"
    seen = f"under {obs.python}, observed by {' + '.join(obs.observers)}" if obs.python else (
        f"observed by {' + '.join(obs.observers)}")
    decided = obs.timed_out or obs.returncode == 0 or bool(obs.script_ran)
    cause = obs.exit_cause or ("" if decided else "no Python exception reported (os._exit or a signal)")
    head = f"{end} after {obs.seconds:.1f} s" + (f": {cause}" if cause else "") + f"; {seen}"
    if decided:
        what = "ran to the end" if obs.returncode == 0 and not obs.timed_out else "what it did until then is judged"
        rows = [Row("sandbox run", "", f"{head} ({what})", "", "INFO")]
    else:
        rows = [Row("sandbox run", "", f"{head}: it stopped before running any of its own functions, so the run "
                    "decided nothing", "dynamic check", "WARN")]
    rows += [Row("network", "", n, "no network access", "FAIL") for n in dict.fromkeys(obs.network)]
    for exe, detail in dict.fromkeys(obs.processes):
        ok = exe in ALLOWED_EXECUTABLES
        rows.append(Row("process", "", detail, "compressors and nvidia-smi only", "INFO" if ok else "FAIL"))
    rows += [Row("native code", "", f"loads {n} (code outside the counted bytes)", "installed packages only", "FAIL")
             for n in obs.native]
    rows += [Row("code from data", "", f"unpickles {t}", "no code in data", "FAIL") for t in obs.unpickled]
    if obs.code_files:
        rows.append(Row("code read", "", f"imports or reads {', '.join(obs.code_files)} from the record folder "
                        "(counted as code bytes)", "", "INFO"))
    if obs.outside_reads:
        rows.append(Row("files read", "", ", ".join(obs.outside_reads[:8]), "", "INFO"))
    if not obs.observer_intact:
        rows.append(Row("observer", "", "the audit stream was cut or tampered with", "", "WARN"))
    clean = not (obs.network or obs.native or obs.unpickled or any(e not in ALLOWED_EXECUTABLES for e, _ in obs.processes))
    if clean and decided:
        rows.append(Row("sandbox verdict", "", "no network, no foreign process, no native or pickled code", "", "PASS"))
    return rows


def experiment_env(f: Folder, inner: str | None) -> dict[str, str]:
    """A packed experiment's own settings for the sandboxed run, as the build's smoke run had them: the fields its
    Config subclass adds, at the values the first log ran with ({} for anything else)."""
    if inner is None or not f.logs:
        return {}
    from tools.record_runs import Run, experiment_config, smoke_env_of
    try:
        added, _ = experiment_config(inner)
    except RecordError:
        return {}
    log = f.logs[min(f.logs)]
    return smoke_env_of(Run(f.path / log.name, f.path / log.name, log.parsed), added) if added else {}


def observe(f: Folder, opts: Options, python: str | None = None, inner: str | None = None) -> Observation | None:
    """The sandboxed run of the folder's script, under `python` when its grammar needs a newer interpreter; a packed
    experiment (`inner`, the decoded source) runs with its logged settings (experiment_env)."""
    if not opts.run:
        return None
    import tempfile

    from tools.record_smoke import smoke_observe
    with tempfile.TemporaryDirectory(prefix="pgolf_check_") as work:
        return smoke_observe(f.code_files(), Path(work), opts.timeout, script=str(f.script_name), python=python,
                             extra_env=experiment_env(f, inner))


# -----------------------------------------------------------------------------------------------------------------
# code bytes
# -----------------------------------------------------------------------------------------------------------------

def _size_of(f: Folder, name: str) -> int:
    path = f.path / name
    if path.is_dir() and not path.is_symlink():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return next((e.size for e in f.entries if e.name == name and e.kind == "file"), 0)


def counted_code(f: Folder, scan: Scan, obs: Observation | None) -> tuple[int, str]:
    """(bytes, how): train_gpt.py plus every file beside it that it imports, execs or reads as code (statically or
    in the sandbox). When nothing else is code, the conventions upstream accepted also count: the log's
    `Code size (compressed)` (in-script compression), or a packed twin in the folder that decodes to the same AST."""
    refs = sorted(set(scan.code_refs) | set(obs.code_files if obs and obs.ran else []))
    own = len(f.script) + sum(_size_of(f, r) for r in refs)
    if refs:
        return own, f"{f.script_name} + {', '.join(refs)} (code it imports, execs or reads)"
    options = [(own, f"{f.script_name} as it is")]
    compressed = [lf.parsed["bytes_code_compressed"] for lf in f.logs.values()]
    if compressed and None not in compressed:
        options.append((max(compressed), "the log's `Code size (compressed)` (in-script compression, accepted "
                                         "upstream)"))
    logged = {lf.parsed["bytes_code"] for lf in f.logs.values()} - {None, len(f.script)}
    for e in f.entries:
        if e.kind == "file" and e.name.endswith(".py") and e.name != f.script_name and e.size in logged:
            if _same_code(f, e.name, scan):
                options.append((e.size, f"the packed twin {e.name} (the file the log counts)"))
    return min(options)


def _same_code(f: Folder, name: str, scan: Scan) -> bool:
    try:
        twin = scan_script(read_bytes(f.path / name, MAX_SCRIPT_BYTES).decode("utf-8", "replace"), other_pythons=False)
        return None not in (twin.inner, scan.inner) and (
            normalized_dump(twin.inner, name) == normalized_dump(scan.inner, "train_gpt.py"))
    except RecordError:
        return False


# -----------------------------------------------------------------------------------------------------------------
# per seed
# -----------------------------------------------------------------------------------------------------------------

def model_bytes(f: Folder, seed: int, log: LogFile) -> tuple[int | None, str]:
    if seed in f.artifacts:
        return f.artifacts[seed].stat().st_size, "artifact file"
    if log.parsed["bytes_model"] is not None:
        return log.parsed["bytes_model"], "logged model bytes (the folder has no artifact)"
    return None, "no artifact and no model bytes in the log"


def check_size(seed: str, code: int | None, code_how: str, model: int | None, model_how: str,
               log: LogFile) -> list[Row]:
    if model is None:
        rows = [Row("size", seed, model_how, CAP, "FAIL")]
    elif code is None:
        rows = [Row("size", seed, f"not measured: {code_how} and the log prints no code size", CAP, "INFO")]
    else:
        total = code + model
        rows = [Row("size", seed, f"{code:,} code + {model:,} model = {total:,} ({code_how}; {model_how})", CAP,
                    passes(total <= ARTIFACT_LIMIT_BYTES))]
    logged = log.parsed["bytes_total"]
    if logged is not None and logged > ARTIFACT_LIMIT_BYTES:
        rows.append(Row("size (log)", seed, f"the run's own total is {logged:,}", CAP, "FAIL"))
    return rows


def phase_budget(phase: str, final: str | None) -> str:
    """Which 600 s budget a ledger phase counts toward, decided from its name (never from its label)."""
    p = phase.lower()
    norm = (final or "").replace("-", "_").replace(" ", "_").lower()
    if p == "train_loop" or "hessian" in p or "calib" in p:
        return "train"
    if "compile" in p or "warmup" in p or p in ("serialize", "deserialize") or not submittable(p):
        return "none"
    if "ttt" in p or "sliding" in p or p == norm:
        return "eval"
    return "none" if p.startswith("quantized") else "unknown"


def _time_limits(track: str, seed: str, what: str, seconds: float, limit: float, hard: bool, how: str) -> Row:
    if track != "10min_16mb":
        return Row(f"{what} time", seed, f"{seconds:.3f} s ({how})", "no limit on this track", "INFO")
    status = "PASS" if seconds <= limit else ("FAIL" if hard else "WARN")
    return Row(f"{what} time", seed, f"{seconds:.3f} s ({how})", f"<= {limit:.3f} s", status)


def step_seconds(p: dict[str, Any]) -> float:
    """One training step's time, from the last two timed step lines (not from the total, which a tampered ledger
    would stretch), else the average step."""
    timed = sorted((pt["step"], pt["train_time_ms"]) for pt in p["train"] if not pt["time_approx"] and pt["step"] > 0)
    if len(timed) >= 2 and timed[-1][0] > timed[-2][0]:
        return (timed[-1][1] - timed[-2][1]) / (timed[-1][0] - timed[-2][0]) / 1000
    return (p["step_avg_ms"] or 0.0) / 1000


def train_tolerance(p: dict[str, Any]) -> float:
    """Seconds the train loop may run past the cap: two steps, at least 0.25 s. The loop stops at the first step
    boundary past the cap, and the stop decision (an all-reduce of "cap reached") is taken on the clock read at the
    previous boundary, so the last step can end up to two steps late; upstream accepted 600.02-600.14 s."""
    return max(2 * step_seconds(p), 0.25)


def check_time(seed: str, p: dict[str, Any], track: str) -> list[Row]:
    """Train loop <= 600 s + tolerance; loop + Hessians past that is a rule risk (WARN); eval <= 600 s."""
    step_s = step_seconds(p)
    train_limit = TIME_LIMIT_SECONDS + train_tolerance(p)
    rows: list[Row] = []
    if p["time_ledger"]:
        sums = {"train": 0.0, "eval": 0.0, "none": 0.0, "unknown": 0.0}
        loop = hess = 0.0
        for row in p["time_ledger"]:
            b = phase_budget(row["phase"], p["final_label"])
            sums[b] += row["seconds"]
            loop += row["seconds"] if row["phase"] == "train_loop" else 0.0
            hess += row["seconds"] if b == "train" and row["phase"] != "train_loop" else 0.0
            if b in ("train", "eval") and row["budget"] != b:
                rows.append(Row("time ledger", seed, f"phase {row['phase']} is labelled budget:{row['budget']} but "
                                f"its name makes it {b}: counted as {b}", "", "WARN"))
            if b == "unknown":
                rows.append(Row("time ledger", seed, f"phase {row['phase']} ({row['seconds']:.1f} s) is not a known "
                                f"phase: counted as eval", "", "WARN"))
        totals = p["time_totals"] or {}
        for b in ("train", "eval"):
            if totals.get(b) is not None and abs(sum(r["seconds"] for r in p["time_ledger"] if r["budget"] == b)
                                                 - totals[b]) > 0.01:
                rows.append(Row("time ledger", seed, f"the {b} rows do not add up to time_ledger_total {totals[b]}",
                                "", "WARN"))
        rows.append(_time_limits(track, seed, "train", loop, train_limit, True, "ledger train_loop"))
        if hess:
            rows.append(_time_limits(track, seed, "train+Hessians", loop + hess, train_limit, False,
                                     f"loop + {hess:.1f} s calibration, from the ledger"))
        rows.append(_time_limits(track, seed, "eval", sums["eval"] + sums["unknown"], TIME_LIMIT_SECONDS, True,
                                 "ledger phases that score the submission"))
        return rows
    if p["train_time_ms"] is None:
        return [Row("train time", seed, "no time ledger and no train time in the log", TLIM,
                    "FAIL" if track == "10min_16mb" else "INFO")]
    loop = p["train_time_ms"] / 1000
    how = "stopping_early line" if p["stop_reason"] == "wallclock_cap" else "train lines"
    rows.append(_time_limits(track, seed, "train", loop, train_limit, True, f"{how}; one step {step_s * 1000:.0f} ms"))
    if p["gptq_hessians_s"] is not None:
        rows.append(_time_limits(track, seed, "train+Hessians", loop + p["gptq_hessians_s"], train_limit, False,
                                 f"loop + GPTQ Hessians {p['gptq_hessians_s']:.1f} s"))
    if p["total_eval_time_s"] is not None:
        ev, how = p["total_eval_time_s"], "total_eval_time"
    else:
        stages = {k: v["eval_time_ms"] for k, v in p["evals"].items() if v["eval_time_ms"] is not None and submittable(k)
                  and ("sliding" in k or "ttt" in k or p["final_label"] in (k, f"{k}_exact"))}
        ev, how = sum(stages.values()) / 1000, " + ".join(stages) or "no timed eval"
    rows.append(_time_limits(track, seed, "eval", ev, TIME_LIMIT_SECONDS, True, how))
    return rows


def check_artifact(seed: str, path: Path, p: dict[str, Any]) -> list[Row]:
    """The artifact is what the log says (size, sha256) and parses as a PGQ artifact."""
    try:
        blob = read_bytes(path, MAX_ARTIFACT_BYTES)
    except UnsafeFile as e:
        return [Row("artifact", seed, str(e), "", "FAIL")]
    rows = []
    if p["bytes_model"] is not None:
        rows.append(Row("artifact size", seed, f"file {len(blob):,} vs logged {p['bytes_model']:,}", "equal",
                        passes(len(blob) == p["bytes_model"])))
    digest = hashlib.sha256(blob).hexdigest()
    if p["artifact_sha256"]:
        rows.append(Row("artifact sha256", seed, f"{digest[:16]}… vs logged {p['artifact_sha256'][:16]}…", "equal",
                        passes(digest == p["artifact_sha256"])))
    else:
        rows.append(Row("artifact sha256", seed, f"{digest[:16]}… (the log records no hash)", "", "INFO"))
    from quant.codec import ArtifactError, parse_artifact
    try:
        manifest, tensors = parse_artifact(blob)
        rows.append(Row("artifact parses", seed, f"{len(tensors)} tensors", "PGQ artifact", "PASS"))
    except (ArtifactError, ValueError, EOFError) as e:
        rows.append(Row("artifact parses", seed, f"does not parse: {str(e)[:120]}", "PGQ artifact", "FAIL"))
    return rows


@functools.lru_cache(maxsize=4)
def _inlined_dump(sources: tuple[tuple[str, str], ...]) -> str:
    return normalized_dump(inline_modules(dict(sources)), "logged")


def check_code_vs_log(seed: str, p: dict[str, Any], f: Folder, scan: Scan) -> list[Row]:
    if not p["sources"]:
        return [Row("code vs log", seed, "the log embeds no framed source; not tied to this script", "", "INFO")]
    text = f.script.decode("utf-8", "replace")
    try:
        same = p["sources"] in ({"train_gpt.py": text}, {f.script_name: text}) or (
            scan.inner is not None and _inlined_dump(tuple(sorted(p["sources"].items())))
            == normalized_dump(scan.inner, "train_gpt.py"))
    except RecordError:
        same = False
    return [Row("code vs log", seed, "the logged sources are this script" if same else
                "the logged sources differ from this script (the score is not this code's)", "AST-equal", passes(same))]


def check_hardware(seed: str, p: dict[str, Any], track: str) -> list[Row]:
    if track != "10min_16mb":
        return []
    if p["runtime"].get("device") == "cpu":
        return [Row("hardware", seed, "ran on CPU", "8xH100 SXM", "FAIL")]
    gpus = p["gpus"]
    if not gpus:
        return [Row("hardware", seed, "no nvidia-smi table in the log (console capture)", "8xH100 SXM", "INFO")]
    ok = len(gpus) == 8 and all("H100" in g for g in gpus)
    return [Row("hardware", seed, f"{len(gpus)}x {', '.join(sorted(set(gpus)))}", "8xH100 SXM", passes(ok))]


# -----------------------------------------------------------------------------------------------------------------
# score, tokenizer, metadata
# -----------------------------------------------------------------------------------------------------------------

def _decimals(x: float) -> int:
    r = repr(float(x))
    return 17 if "e" in r else len(r.split(".")[1]) if "." in r else 0


def agrees(reported: Any, actual: float) -> bool:
    """`reported` equals `actual` to the precision it was written with."""
    if not isinstance(reported, int | float) or isinstance(reported, bool):
        return False
    return abs(float(reported) - actual) <= 0.5 * 10.0 ** -_decimals(reported) + 1e-12


def score_row(check: str, seed: str, claimed: Any, logged: float, label: str) -> Row:
    """FAIL when the claim is better (lower) than the log by more than SCORE_TOLERANCE_BPB; WARN on any other
    disagreement beyond the claim's printed precision."""
    if not isinstance(claimed, int | float) or isinstance(claimed, bool):
        return Row(check, seed, f"{claimed!r} is not a number", "", "WARN")
    value = f"claimed {claimed} vs log {logged:.8f} ({label})"
    if logged - float(claimed) > SCORE_TOLERANCE_BPB:
        return Row(check, seed, value, f"not better than the log by > {SCORE_TOLERANCE_BPB:g}", "FAIL")
    return Row(check, seed, value, "agree to printed precision", passes(agrees(claimed, logged), "WARN"))


def mean_row(claimed: Any, mean: float, n: int, claims_mean: float | None) -> Row:
    """The claimed mean against the logs' mean. Authors often average their already-rounded per-seed scores, so the
    mean of the per-seed claims is accepted, and so is a difference within one unit of the claim's last printed
    digit; a claim better than the logs by more than SCORE_TOLERANCE_BPB still fails."""
    row = score_row("json val_bpb (mean)", "", claimed, mean, f"{n}-seed mean")
    if row.status != "WARN" or not isinstance(claimed, int | float) or isinstance(claimed, bool):
        return row
    if claims_mean is not None and agrees(claimed, claims_mean):
        return Row(row.check, "", f"{row.value}; the mean of the per-seed claims is {claims_mean:.8f}",
                   "agree to printed precision", "PASS")
    unit = 10.0 ** -_decimals(claimed)
    if abs(float(claimed) - mean) <= unit + 1e-12:
        return Row(row.check, "", f"{row.value}; within one unit ({unit:g}) of the last printed digit",
                   "agree to printed precision", "PASS")
    return row


def finals(f: Folder) -> dict[int, tuple[str, float, float, str]]:
    """Per seed (label, bpb, loss, why): the submitted score. One label for all seeds: the declared one, else the
    submittable label whose scores are closest to the claims over all seeds (so one wrong claim cannot move its own
    seed to another line), else each log's last submittable line."""
    declared = next((f.claims.get(k) for k in ("eval", "final_label", "eval_label", "metric")
                     if isinstance(f.claims.get(k), str)), None)
    mean_claim = f.claims.get("val_bpb")
    mean_claim = mean_claim if isinstance(mean_claim, int | float) and not isinstance(mean_claim, bool) else None
    claims = {seed: f.claims.per_seed.get(seed, {}).get("val_bpb", mean_claim) for seed in f.logs}
    shared = set.intersection(*(set(lf.parsed["evals"]) for lf in f.logs.values())) if f.logs else set()
    shared = {lab for lab in shared if submittable(lab)}
    label, why = None, ""
    if declared and declared in shared:
        label, why = declared, f"declared `{declared}`"
    elif shared and any(c is not None for c in claims.values()):
        def cost(lab: str) -> tuple[float, int]:
            gaps = [abs(f.logs[s].parsed["evals"][lab]["val_bpb"] - c) for s, c in claims.items() if c is not None]
            order = max(lf.parsed["evals"][lab]["order"] for lf in f.logs.values())
            return sum(gaps), -order
        label = min(shared, key=cost)
        why = "the line the claims match best over all seeds"
    out = {}
    for seed, log in f.logs.items():
        lab, w = (label, why) if label is not None else select_final(log.parsed, declared)
        if lab is not None:
            ev = log.parsed["evals"][lab]
            out[seed] = (lab, ev["val_bpb"], ev["val_loss"], w)
    return out


def check_score(f: Folder, chosen: dict[int, tuple[str, float, float, str]]) -> list[Row]:
    rows: list[Row] = []
    if not chosen:
        return [Row("score", "", "no training log with a score line supports the submission", "a log per seed", "FAIL")]
    for seed, (label, bpb, loss, why) in sorted(chosen.items()):
        s = str(seed) if seed >= 0 else "-"
        rows.append(Row("score", s, f"{label} val_bpb {bpb:.8f} ({why})", "", "INFO"))
        claim = f.claims.per_seed.get(seed, {})
        if "val_bpb" in claim:
            rows.append(score_row("json val_bpb", s, claim["val_bpb"], bpb, label))
        if "val_loss" in claim:
            rows.append(Row("json val_loss", s, f"{claim['val_loss']} vs log {loss:.8f}", "agree",
                            passes(agrees(claim["val_loss"], loss), "WARN")))
        steps = f.logs[seed].parsed["steps"]
        if "steps" in claim and steps is not None:
            rows.append(Row("json steps", s, f"{claim['steps']} vs log {steps}", "equal",
                            passes(claim["steps"] == steps, "WARN")))
    mean = statistics.fmean(v[1] for v in chosen.values())
    if "val_bpb" in f.claims.raw:
        claims = [f.claims.per_seed.get(seed, {}).get("val_bpb") for seed in chosen]
        claims_mean = statistics.fmean(claims) if all(isinstance(c, int | float) for c in claims) else None
        rows.append(mean_row(f.claims.get("val_bpb"), mean, len(chosen), claims_mean))
    else:
        rows.append(Row("json val_bpb (mean)", "", "submission.json states no val_bpb", "", "WARN"))
    return rows


def check_tokenizer(f: Folder, dataset: Path | None) -> list[Row]:
    """Every seed used the same tokenizer, the one submission.json and the dataset manifest name."""
    hashes = {seed: log.parsed["tokenizer_sha256"] for seed, log in f.logs.items()}
    known = {h for h in hashes.values() if h}
    if not known:
        return [Row("tokenizer", "", "no `tokenizer: sha256:` line in the logs (not comparable)", "", "INFO")]
    rows = []
    if len(known) > 1 or None in hashes.values():
        rows.append(Row("tokenizer", "", f"the seeds logged different tokenizers: {sorted(map(str, hashes.values()))}",
                        "one tokenizer", "FAIL"))
    want: list[tuple[str, str]] = []
    if isinstance(f.claims.get("tokenizer_sha256"), str):
        want.append(("submission.json", f.claims.get("tokenizer_sha256")))
    if dataset is not None:
        try:
            import json
            manifest = json.loads(read_bytes(dataset / "manifest.json", MAX_JSON_BYTES))
            want.append((f"{dataset}/manifest.json", manifest.get("tokenizer_sha256")))
        except (UnsafeFile, ValueError) as e:
            rows.append(Row("tokenizer", "", f"--dataset: {e}", "", "WARN"))
    for where, h in want:
        ok = known == {h}
        rows.append(Row("tokenizer", "", f"logged {sorted(known)[0][:16]}… vs {where} {str(h)[:16]}…", "same sha256",
                        passes(ok)))
    if not want:
        rows.append(Row("tokenizer", "", f"sha256 {sorted(known)[0][:16]}… on every seed", "", "INFO"))
    return rows


def check_metadata(f: Folder, code: int | None, totals: dict[int, int]) -> list[Row]:
    rows = []
    listed = set(f.claims.seeds or [])
    logged = {s for s in f.logs if s >= 0}
    if f.claims.seeds is None:
        rows.append(Row("seeds", "", f"submission.json lists no seeds; the logs hold {sorted(logged) or 'none'}", "",
                        "INFO"))
    for s in sorted(listed - logged):
        rows.append(Row("seed log", str(s), "listed in submission.json, no log for it", "present", "WARN"))
    for s in sorted(logged - listed) if f.claims.seeds is not None else []:
        rows.append(Row("seed log", str(s), "a log for a seed submission.json does not list", "listed", "WARN"))
    sub_code, sub_total = f.claims.get("bytes_code"), f.claims.get("bytes_total")
    if isinstance(sub_code, int) and code is not None and sub_code != code:
        rows.append(Row("json bytes_code", "", f"{sub_code:,} vs counted {code:,}", "equal", "WARN"))
    if isinstance(sub_total, int) and totals:
        worst = max(totals.values())
        mean = statistics.fmean(totals.values())
        if abs(sub_total - mean) <= 1 and sub_total != worst:  # a common convention; each seed is sized above
            rows.append(Row("json bytes_total", "", f"{sub_total:,} is the mean over seeds (max {worst:,}); every "
                            "seed's own size is checked above", "", "INFO"))
        elif sub_total != worst:
            rows.append(Row("json bytes_total", "", f"{sub_total:,} vs max over seeds {worst:,}", "the max", "WARN"))
        if sub_total > ARTIFACT_LIMIT_BYTES:
            rows.append(Row("json bytes_total", "", f"{sub_total:,} declared", CAP, "FAIL"))
    return rows


def check_readable_twin(f: Folder, scan: Scan) -> list[Row]:
    for name in ("train_gpt_readable.py", "train_gpt_human.py"):
        if any(e.name == name and e.kind == "file" for e in f.entries) and scan.inner is not None:
            if _same_code(f, name, scan):
                return [Row("readable twin", "", f"{name} is AST-equivalent to the counted script", "", "PASS")]
            return [Row("readable twin", "", f"{name} differs from the counted script", "equal", "WARN")]
    return []


# -----------------------------------------------------------------------------------------------------------------
# the folder
# -----------------------------------------------------------------------------------------------------------------

def check_folder(folder: Path, opts: Options | None = None) -> list[Row]:
    opts = opts or Options()
    f = load_folder(folder)
    track = f.claims.track
    rows = check_inputs(f)
    scan: Scan | None = None
    code: int | None = None
    code_how = "no script in the folder"
    if f.script_name is None:
        rows.append(Row("script", "", str(f.script_problem), "required file", "FAIL"))
    else:
        if f.script_problem:
            rows.append(Row("script name", "", f.script_problem, SCRIPT, "WARN"))
        scan = scan_script(f.script.decode("utf-8", "replace"), f.sibling_names())
        rows += check_script(scan, len(f.script)) + check_readable_twin(f, scan)
        obs = observe(f, opts, scan.python, scan.inner)
        rows += check_observation(obs)
        code, code_how = counted_code(f, scan, obs)
    totals: dict[int, int] = {}
    for seed, log in sorted(f.logs.items()):
        s, p = (str(seed) if seed >= 0 else "-"), log.parsed
        model, model_how = model_bytes(f, seed, log)
        c, c_how = (code, code_how) if code is not None or p["bytes_code"] is None else (
            p["bytes_code"], "the log's code size (no script in the folder)")
        if model is not None and c is not None:
            totals[seed] = c + model
        rows += check_size(s, c, c_how, model, model_how, log)
        rows += check_time(s, p, track)
        if seed in f.artifacts:
            rows += check_artifact(s, f.artifacts[seed], p)
        elif f.artifacts:
            rows.append(Row("artifact", s, f"no final_model_seed{seed}.*.ptz beside the others", "present", "FAIL"))
        rows += (check_code_vs_log(s, p, f, scan) if scan is not None else []) + check_hardware(s, p, track)
    if not f.logs:
        rows.append(Row("size", "", "no training log: nothing supports the sizes", CAP, "FAIL"))
    chosen = finals(f)
    rows += check_score(f, chosen) + check_tokenizer(f, opts.dataset) + check_metadata(f, code, totals)
    if opts.against is not None:
        rows += significance_rows([v[1] for _, v in sorted(chosen.items())],
                                  [(v[2], v[1]) for _, v in sorted(chosen.items())], opts.against, opts.alpha)
    return rows


def reference_scores(folder: Path) -> list[float]:
    """A reference record's per-seed submitted bpb: from its logs, else from its submission.json."""
    if not folder.is_dir():
        raise FolderError(f"--against {folder}: not a directory")
    f = load_folder(folder)
    scores = [v[1] for _, v in sorted(finals(f).items())]
    return scores or [float(c["val_bpb"]) for c in f.claims.per_seed.values() if "val_bpb" in c]


def significance_rows(cand: list[float], loss_bpb: list[tuple[float, float]], against: Path, alpha: float) -> list[Row]:
    ref = reference_scores(against)
    if len(cand) < 2 or len(ref) < 2:
        return [Row("significance", "", f"{len(cand)} candidate vs {len(ref)} reference seeds", ">= 2 each", "FAIL")]
    tpb = statistics.fmean(tokens_per_byte(loss, bpb) for loss, bpb in loss_bpb)
    margin = nats_to_bpb(RECORD_MARGIN_NATS, tpb)
    try:
        w = welch_one_sided(cand, ref, margin)
    except ValueError as e:
        return [Row("significance", "", str(e), f"p < {alpha}", "FAIL")]
    delta = w.mean_reference - w.mean_candidate
    rows = [Row("significance", "", f"Δ = {delta:.5f} bpb (ref {w.mean_reference:.5f} n={w.n_reference}, this "
                f"{w.mean_candidate:.5f} n={w.n_candidate}), margin {margin:.5f} bpb = 0.005 nats at "
                f"{tpb:.4f} tokens/byte; Welch t = {w.t:.3f}, df = {w.df:.1f}, p = {w.p:.4g}", f"p < {alpha}",
                passes(w.p < alpha))]
    plan = seeds_needed(w.std_candidate, w.std_reference, w.n_reference, delta, alpha=alpha, margin=margin)
    rows.append(Row("seeds needed", "", plan.message, "", "INFO"))
    return rows
