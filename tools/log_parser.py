"""Parse a training log into one dict: ours (logs/<RUN_ID>.txt), the upstream record formats, or the root baseline
(docs/log_format.md has every line kind, who writes it and who reads it).

Log files embed the script's source, which is full of format strings that look like log lines. Ours frame each code
file byte-exactly (`source_file: <name> bytes:<N>`, N bytes, a newline); those frames are returned as `sources` and
cut off first. In what is left, and in upstream logs (which embed unframed source), the header is located
structurally: the block that starts with a 100-'=' line followed by `Running Python` ends at the next 100-'=' line,
and only what follows is parsed. Without such a block the text after the first 100-'=' line is parsed; without any,
the whole text (console captures).

The parse is a pipeline of small steps: split off sources -> clean lines (CR, timestamps) -> split off the header ->
`scan` (one pass that files each line under its kind) -> assemble identity, curves, train totals, bytes and scores.
Which score is the submitted one is not decided by position alone: `select_final` prefers a declared label, then the
score the submission claims.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from tools import log_lines as L

SEP = "=" * 100
SOURCE_HEAD = re.compile(rb"source_file: (\S+) bytes:(\d+)")
HPARAM_HEAD = re.compile(r"^Hyperparameters:\s*$")
HPARAM = re.compile(r"^  ([A-Za-z_][A-Za-z0-9_]*):(?: (.*))?$")
parse_value = L.parse_value


def split_sources(text: str) -> tuple[dict[str, str], str, str | None]:
    """(sources, rest, error): the byte-exact `source_file:` frames at the start of a log file, the text after them,
    and None, or a message saying where the framing breaks (the sources read so far, the rest from that frame on)."""
    data = text.encode("utf-8", errors="surrogateescape")
    sources: dict[str, str] = {}
    pos = 0
    while data.startswith(b"source_file: ", pos):
        eol = data.find(b"\n", pos)
        m = SOURCE_HEAD.fullmatch(data[pos:eol]) if eol >= 0 else None
        if not m:
            return sources, data[pos:].decode("utf-8", errors="replace"), f"malformed source header at byte {pos}"
        name, n = m.group(1).decode("utf-8", errors="replace"), int(m.group(2))
        start, end = eol + 1, eol + 1 + n
        if data[end:end + 1] != b"\n":
            return sources, data[pos:].decode("utf-8", errors="replace"), (
                f"source {name}: {n} bytes announced but the frame does not end there (truncated log?)")
        sources[name] = data[start:end].decode("utf-8", errors="replace")
        pos = end + 1
    return sources, data[pos:].decode("utf-8", errors="replace"), None


def split_header(lines: list[str]) -> tuple[list[str], list[str]]:
    """(header, body): header = lines between the first separator and the log proper (see module docstring)."""
    seps = [i for i, line in enumerate(lines) if line == SEP]
    if not seps:
        return [], lines
    for k, i in enumerate(seps):
        if i + 1 < len(lines) and lines[i + 1].startswith("Running Python"):
            end = seps[k + 1] if k + 1 < len(seps) else len(lines)
            return lines[seps[0] + 1 : end], lines[end + 1 :]
    return [], lines[seps[0] + 1 :]


def parse_hyperparameters(lines: list[str]) -> dict[str, Any] | None:
    """The `Hyperparameters:` block (`  key: value` lines up to the first other line), or None if absent."""
    for i, line in enumerate(lines):
        if HPARAM_HEAD.match(line):
            out: dict[str, Any] = {}
            for item in lines[i + 1 :]:
                m = HPARAM.match(item)
                if not m:
                    break
                out[m.group(1)] = parse_value((m.group(2) or "").strip())
            return out
    return None


# -----------------------------------------------------------------------------------------------------------------
# one pass over the body
# -----------------------------------------------------------------------------------------------------------------

@dataclass
class Scan:
    """Every recognized line of a log body, filed by kind (raw values; `assemble` turns them into the result)."""
    rec_train: list[tuple[int, float, float, float]] = field(default_factory=list)  # step, loss, minutes, tok/s
    b_train: list[tuple[int, float, float]] = field(default_factory=list)  # baseline step, loss, ms
    val: list[tuple[int, float, float, float | None]] = field(default_factory=list)  # step, loss, bpb, ms|None
    iterations_seen: int | None = None
    stop: tuple[str, float, int, int] | None = None  # reason, ms, step, iterations
    evals: list[L.EvalLine] = field(default_factory=list)
    code_sizes: dict[str | None, int] = field(default_factory=dict)
    model_sizes: dict[str | None, int] = field(default_factory=dict)
    totals: list[tuple[str | None, int]] = field(default_factory=list)
    ours_bytes: dict[str, int] = field(default_factory=dict)
    ledger: list[dict[str, Any]] = field(default_factory=list)
    ledger_total: dict[str, float] | None = None
    b_settings: tuple[int, int] | None = None
    values: dict[str, Any] = field(default_factory=dict)  # single-valued facts (seed, model_params, ...)
    format: str | None = None


def _scan_ours(s: Scan, line: str) -> bool:
    """Our own line kinds (also P's and N's, which share them); True when the line was one."""
    if v := L.match_ours("train", line):
        s.rec_train.append((v["step"], v["train_loss"], v["minutes"], v["tok_s"]))
        s.iterations_seen, s.format = v["iterations"], s.format or "record"
    elif v := L.match_ours("val", line):
        s.val.append((v["step"], v["val_loss"], v["val_bpb"], None))
        s.iterations_seen = v["iterations"]
    elif v := L.match_ours("stop", line):
        s.stop = ("wallclock_cap", v["ms"], v["step"], v["iterations"])
    elif v := L.match_ours("bytes", line):
        s.ours_bytes[v["part"]] = v["n"]
        s.format = "ours"
    elif v := L.match_ours("ledger", line):
        s.ledger.append({"phase": v["phase"], "seconds": v["seconds"], "budget": v["budget"]})
        s.format = "ours"
    elif v := L.match_ours("ledger_total", line):
        s.ledger_total = {"train": v["train"], "eval": v["eval"], "limit": v["limit"]}
        s.format = "ours"
    elif v := L.match_ours("tokenizer", line):
        s.values["tokenizer_sha256"], s.values["tokenizer_vocab"] = v["sha256"], v["vocab"]
    elif v := L.match_ours("artifact", line):
        s.values["artifact_name"], s.values["artifact_sha256"] = v["name"], v["sha256"]
    elif v := L.match_ours("val_bytes", line):
        s.values["val_bytes_source"], s.values["val_bytes_total"] = v["source"], v["total"]
    elif v := L.match_ours("peak_memory", line):
        s.values["peak_mem_allocated_mib"], s.values["peak_mem_reserved_mib"] = v["allocated"], v["reserved"]
    elif v := L.match_ours("gptq_reserve", line):
        s.values["gptq_reserve_s"] = v["seconds"]
    elif v := L.match_ours("gptq_collected", line):
        s.values["gptq_hessians_s"] = v["seconds"]
    else:
        return False
    return True


def _scan_upstream(s: Scan, line: str) -> bool:
    """Upstream-only line kinds (the root baseline, N's sizes and eval total); True when the line was one."""
    U = L.UPSTREAM
    if m := U["b_train"].match(line):
        s.b_train.append((int(m[1]), float(m[3]), float(m[4])))
        s.iterations_seen, s.format = int(m[2]), "baseline"
    elif m := U["b_val"].match(line):
        s.val.append((int(m[1]), float(m[3]), float(m[4]), float(m[5])))
        s.iterations_seen, s.format = int(m[2]), "baseline"
    elif m := U["code_size"].match(line):
        s.code_sizes[m[1]] = int(m[2])
    elif m := U["ser_model"].match(line):
        s.model_sizes[m[1]] = int(m[2])
    elif m := U["total_size"].match(line):
        s.totals.append((m[1], int(m[2])))
    elif m := U["world"].match(line):
        s.values["world_size"], s.values["grad_accum_steps"] = int(m[1]), int(m[2])
        s.values["runtime"] = {k: parse_value(v) for k, v in L.KV.findall(m[3])}
    elif m := U["seed"].match(line):
        s.values["seed"] = int(m[1])
    elif m := U["settings"].match(line):
        s.b_settings = (int(m[1]), int(m[2]))
    elif m := U["total_eval"].match(line):
        s.values["total_eval_time_s"] = float(m[1])
    else:
        for key in ("train_shards", "val_tokens", "layer_loop", "model_params"):
            if m := U[key].match(line):
                s.values["layer_loop_step" if key == "layer_loop" else key] = int(m[1])
                return True
        return False
    return True


def scan(body: list[str]) -> Scan:
    s = Scan()
    for line in body:
        if _scan_ours(s, line) or _scan_upstream(s, line):
            continue
        if ev := L.parse_eval(line):
            s.evals.append(ev)
    return s


# -----------------------------------------------------------------------------------------------------------------
# assembling the result
# -----------------------------------------------------------------------------------------------------------------

def _record_time_ms(step: int, minutes: float, tok_s: float, batch_tokens: int | None) -> tuple[float, bool]:
    """Train time of a record-format step line: exact from tok/s when it agrees with the printed minutes (tok/s is
    step*train_batch_tokens/elapsed on the same clock), else the minutes (printed with .1f, +-3 s)."""
    if batch_tokens and tok_s > 0 and step > 0:
        ms = round(step * batch_tokens / tok_s * 1000.0, 1)
        if abs(ms / 60000.0 - minutes) <= 0.0501:
            return ms, False
    return minutes * 60000.0, True


# Time points are (step, ms, rank): rank 0 = logged in ms (stop line, ledger, baseline), 1 = recovered from tok/s,
# 2 = minute-resolution (approximate). Lower rank wins at equal step.
TimePoint = tuple[int, float, int]


def _interp_time(step: int, points: list[TimePoint]) -> tuple[float | None, bool]:
    """(ms, approx) at `step` from points sorted by (step, rank): exact step match, else linear interpolation."""
    for s, ms, rank in points:
        if s == step:
            return ms, rank == 2
    below = [p for p in points if p[0] < step]
    above = [p for p in points if p[0] > step]
    if below and above:
        (s0, t0, _), (s1, t1, _) = below[-1], above[0]
        return t0 + (t1 - t0) * (step - s0) / (s1 - s0), True
    return None, True


def _identity(r: dict[str, Any], s: Scan, hp: dict[str, Any]) -> None:
    if r["seed"] is None and isinstance(hp.get("seed"), int):
        r["seed"] = hp["seed"]
    for key in ("world_size", "grad_accum_steps"):
        if r[key] is None and isinstance(hp.get(key), int):
            r[key] = hp[key]
    tbt = hp.get("train_batch_tokens")
    r["train_batch_tokens"] = tbt if isinstance(tbt, int) else (s.b_settings[0] if s.b_settings else None)
    if isinstance(hp.get("iterations"), int):
        r["iterations"] = hp["iterations"]
    elif s.stop or s.iterations_seen:
        r["iterations"] = s.stop[3] if s.stop else s.iterations_seen
    elif s.b_settings:
        r["iterations"] = s.b_settings[1]
    r["format"] = s.format or ("record" if s.val or s.evals else None)


def _curves(r: dict[str, Any], s: Scan) -> list[TimePoint]:
    """Train and val curves; returns the time points (step, ms, rank) the train totals are estimated from."""
    points: list[TimePoint] = []
    for step, loss, ms in s.b_train:
        r["train"].append({"step": step, "train_loss": loss, "train_time_ms": ms, "tok_s": None, "time_approx": False})
        points.append((step, ms, 0))
    points += [(step, ms, 0) for step, _, _, ms in s.val if ms is not None]
    for step, loss, minutes, tok_s in s.rec_train:
        ms, approx = _record_time_ms(step, minutes, tok_s, r["train_batch_tokens"])
        r["train"].append({"step": step, "train_loss": loss, "train_time_ms": ms, "tok_s": tok_s, "time_approx": approx})
        points.append((step, ms, 2 if approx else 1))
    max_step = max([p[0] for p in points] + [v[0] for v in s.val], default=0)
    ledger_train = next((row["seconds"] for row in s.ledger if row["phase"] == "train_loop"), None)
    if s.stop:
        points.append((s.stop[2], s.stop[1], 0))
    elif ledger_train is not None and max_step:
        points.append((max_step, ledger_train * 1000.0, 0))
    points.append((0, 0.0, 0))
    points.sort(key=lambda p: (p[0], p[2]))
    for step, loss, bpb, ms in s.val:
        approx = False
        if ms is None:
            ms, approx = _interp_time(step, points)
        r["val"].append({"step": step, "val_loss": loss, "val_bpb": bpb, "train_time_ms": ms, "time_approx": approx})
    r["steps"] = s.stop[2] if s.stop else (max_step or None)
    return points


def _train_totals(r: dict[str, Any], s: Scan, points: list[TimePoint]) -> None:
    ledger_train = next((row["seconds"] for row in s.ledger if row["phase"] == "train_loop"), None)
    if s.stop:
        r["train_time_ms"], r["train_time_approx"], r["stop_reason"] = s.stop[1], False, s.stop[0]
    elif ledger_train is not None:
        r["train_time_ms"], r["train_time_approx"] = ledger_train * 1000.0, False
    elif r["steps"]:
        last = max((p for p in points if p[0] > 0), key=lambda p: (p[0], -p[2]), default=None)
        if last is not None:
            scale = r["steps"] / last[0]  # the last timed line may precede the final step
            r["train_time_ms"], r["train_time_approx"] = last[1] * scale, last[2] == 2 or scale != 1.0
    if r["stop_reason"] is None and r["steps"] and r["steps"] == r["iterations"]:
        r["stop_reason"] = "iterations"
    if r["train_time_ms"] is not None and r["steps"]:
        r["step_avg_ms"] = r["train_time_ms"] / r["steps"]


def _bytes(r: dict[str, Any], s: Scan) -> None:
    """Our explicit bytes_ lines > the scheme-qualified size lines > the unqualified ones."""
    r["bytes_code_uncompressed"] = s.code_sizes.get("uncompressed")
    r["bytes_code_compressed"] = s.code_sizes.get("compressed")
    r["bytes_code"] = s.ours_bytes.get("code", s.code_sizes.get("compressed", s.code_sizes.get(None)))
    r["bytes_model_raw"] = s.model_sizes.get(None)
    schemed_models = [v for k, v in s.model_sizes.items() if k is not None]
    r["bytes_model"] = s.ours_bytes.get("model", schemed_models[-1] if schemed_models else None)
    schemed = [t for t in s.totals if t[0] is not None]
    if schemed:
        r["artifact_scheme"] = schemed[-1][0]
    total = schemed[-1][1] if schemed else (s.totals[-1][1] if s.totals else None)
    r["bytes_total"] = s.ours_bytes.get("total", total)


def _evals(r: dict[str, Any], s: Scan) -> None:
    for order, ev in enumerate(s.evals):
        r["evals"].pop(ev.label, None)  # a repeated label keeps its last value and position
        r["evals"][ev.label] = {"val_loss": ev.val_loss, "val_bpb": ev.val_bpb, "eval_time_ms": ev.eval_time_ms,
                                "name": ev.name, "attrs": ev.attrs, "note": ev.note, "order": order}
    label = select_final(r)[0]
    if label is not None:
        r["final_label"] = label
        r["final_val_loss"] = r["evals"][label]["val_loss"]
        r["final_val_bpb"] = r["evals"][label]["val_bpb"]


def select_final(parsed: dict[str, Any], declared: str | None = None,
                 claimed_bpb: float | None = None) -> tuple[str | None, str]:
    """(label, why) of the submitted score among a parsed log's evals.

    1. a declared label (submission.json `eval`/`final_label`, or --final) when the log has it (by label or name);
    2. the score line the submission claims: the submittable eval closest to `claimed_bpb`;
    3. the last submittable eval in log order (an `_exact` twin after its rounded line wins by position).
    Pre-quantization and `diagnostic` evals are never the submitted score: they do not score the artifact."""
    evals = parsed["evals"]
    if declared:
        for label, ev in evals.items():
            if declared in (label, ev.get("name")):
                return label, f"declared `{declared}`"
    ok = [label for label in evals if L.submittable(label)] or list(evals)
    if not ok:
        return None, "no score line"
    if claimed_bpb is not None and math.isfinite(claimed_bpb):
        best = min(ok, key=lambda lab: (abs(evals[lab]["val_bpb"] - claimed_bpb), -evals[lab]["order"]))
        return best, f"closest to the claimed {claimed_bpb}"
    return ok[-1], "last submittable score line"


def empty_result(sources: dict[str, str], sources_error: str | None, header: list[str],
                 hp: dict[str, Any]) -> dict[str, Any]:
    versions = {m.group(1): m.group(2) for m in map(L.RUNNING.match, header) if m}
    keys = ("format seed steps iterations stop_reason train_time_ms train_time_approx step_avg_ms final_label "
            "final_val_loss final_val_bpb bytes_code bytes_code_uncompressed bytes_code_compressed bytes_model "
            "bytes_model_raw bytes_total artifact_scheme model_params world_size grad_accum_steps train_shards "
            "val_tokens train_batch_tokens layer_loop_step gptq_reserve_s gptq_hessians_s peak_mem_allocated_mib "
            "peak_mem_reserved_mib total_eval_time_s tokenizer_sha256 tokenizer_vocab artifact_name artifact_sha256 "
            "val_bytes_source val_bytes_total time_totals").split()
    r: dict[str, Any] = dict.fromkeys(keys)
    r.update(runtime={}, python_version=versions.get("Python"), torch_version=versions.get("PyTorch"),
             gpus=[m.group(1) for m in map(L.GPU_ROW.match, header) if m], sources=sources,
             code_bytes_logged=sum(len(v.encode("utf-8")) for v in sources.values()) if sources else None,
             sources_error=sources_error, evals={}, time_ledger=[], hyperparameters=hp, train=[], val=[])
    return r


def parse_log(text: str) -> dict[str, Any]:
    """Parse one log's text. Keys absent from the log are None (lists/dicts empty)."""
    sources, text, sources_error = split_sources(text)
    header, body = split_header([L.clean_line(line) for line in text.split("\n")])  # timestamps off first
    body = [line for line in body if not L.NOISE.match(line)]
    hp = parse_hyperparameters(body)
    if hp is None:
        hp = parse_hyperparameters(header) or {}
    s = scan(body)
    r = empty_result(sources, sources_error, header, hp)
    r.update({k: v for k, v in s.values.items() if k in r})
    r["time_ledger"], r["time_totals"] = s.ledger, s.ledger_total
    _identity(r, s, hp)
    points = _curves(r, s)
    _train_totals(r, s, points)
    _bytes(r, s)
    _evals(r, s)
    return r


def json_safe(obj: Any) -> Any:
    """Non-finite floats (a diverged loss) become null so every output line is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj
