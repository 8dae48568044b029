"""Parse a training log into one dict: ours (logs/<RUN_ID>.txt), upstream records P/N, or the root baseline.

Usage: `python tools/parse_log.py LOG [LOG...]` prints one JSON object per log, one per line.

Formats (STACK.md §E.1-E.3, ECOSYSTEM.md §8):
* ours / record P and N: `  key: value` hyperparameter dump, `S/N train_loss: X train_time: Mm tok/s: K` step lines,
  `S/N val_loss: X val_bpb: Y` val lines, `<label> val_loss:… val_bpb:… eval_time:…ms` final evals; ours adds
  `bytes_code:`/`bytes_model:`/`bytes_total:` and the `time_ledger` lines; N adds `Code size (compressed)`,
  `diagnostic …` evals and `total_eval_time:…s`.
* root baseline: `step:S/N train_loss:X train_time:Tms step_avg:Ams`, `seed:1337`, `final_int8_zlib_roundtrip_exact`.

Log files (not console captures) embed the script's source, which is full of format strings that look like log
lines. Ours frame each code file that ran byte-exactly: a `source_file: <name> bytes:<N>` line, exactly N bytes of
the file's UTF-8 text, then one newline; these are returned as `sources` and cut off before anything else is
parsed. In what is left (and in upstream logs, which embed unframed source) the header is located structurally:
the block that starts with a 100-'=' line followed by `Running Python` ends at the next 100-'=' line, and only
what follows is parsed as the log. That covers the three layouts seen: source first (ours, baseline),
hyperparameters first (P), hyperparameters then source (N's log file). Without such a block the text after the
first 100-'=' line is parsed; without any, the whole text (console captures). GPU names come from the nvidia-smi
table in that header (`gpus`, empty on CPU runs and console captures).

Step-line times: the record format prints train_time in minutes with one decimal (±3 s). Its tok/s column is
step·train_batch_tokens/elapsed from the same clock (P's code), so when train_batch_tokens is known the time is
recovered from tok/s (relative error ≤ 0.5/tok_s), after checking it rounds to the printed minutes; otherwise the
minutes are used and the point is flagged `time_approx: true`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

SEP = "=" * 100
_F = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf"


def _re(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern.replace("{F}", f"(?:{_F})"))


# torchrun / c10d / NCCL noise (`W0409 04:38:18.092000 206 torch/...`, `[rank0]:[W318 ...]`, `[W318 ...]`)
NOISE = _re(r"^(?:[WIEF]\d{4} \d\d:\d\d:\d\d|\[rank\d+\]:|\[[WIEF]\d{3,4} )")
HPARAM_HEAD = _re(r"^Hyperparameters:\s*$")
HPARAM = _re(r"^  ([A-Za-z_][A-Za-z0-9_]*):(?: (.*))?$")
REC_TRAIN = _re(r"^(\d+)/(\d+) train_loss: ({F}) train_time: ({F})m tok/s: ({F})$")
REC_VAL = _re(r"^(\d+)/(\d+) val_loss: ({F}) val_bpb: ({F})$")
B_TRAIN = _re(r"^step:(\d+)/(\d+) train_loss:({F}) train_time:({F})ms step_avg:({F})ms$")
B_VAL = _re(r"^step:(\d+)/(\d+) val_loss:({F}) val_bpb:({F}) train_time:({F})ms step_avg:({F})ms$")
STOP = _re(r"^stopping_early: (\S+) train_time: ?({F})ms step: ?(\d+)/(\d+)$")
EVAL = _re(r"^([A-Za-z][A-Za-z0-9_+.\- ]*?) val_loss:({F}) val_bpb:({F})(?: eval_time:({F})ms)?$")
CODE_SIZE = _re(r"^Code size(?: \((uncompressed|compressed)\))?: (\d+) bytes$")
SER_MODEL = _re(r"^Serialized model(?: (\S+))?: (\d+) bytes\b")
TOTAL_SIZE = _re(r"^Total submission size(?: (\S+))?: (\d+) bytes$")
OUR_BYTES = _re(r"^bytes_(code|model|total):(\d+)$")
MODEL_PARAMS = _re(r"^model_params: ?(\d+)$")
WORLD = _re(r"^world_size: ?(\d+) grad_accum_steps: ?(\d+)(.*)$")
TRAIN_SHARDS = _re(r"^(?:train_shards: |train_loader:\S* train_shards:)(\d+)$")
VAL_TOKENS = _re(r"^(?:val_tokens: |val_loader:.* tokens:)(\d+)$")
B_SEED = _re(r"^seed:(\d+)$")
B_SETTINGS = _re(r"^train_batch_tokens:(\d+) .*\biterations:(\d+)\b")
LAYER_LOOP = _re(r"^layer_loop:enabled step: ?(\d+)")
TOTAL_EVAL = _re(r"^total_eval_time: ?({F})s$")
PEAK_MEM = _re(r"^peak memory allocated: (\d+) MiB reserved: (\d+) MiB$")
GPTQ_RESERVE = _re(r"^gptq:reserving ({F})s, effective=({F})ms$")
GPTQ_HESS = _re(r"^GPTQ:collected (\d+) Hessians in ({F})s$")
LEDGER = _re(r"^time_ledger phase:(\S+) seconds:({F}) budget:(\S+)$")
LEDGER_TOTAL = _re(r"^time_ledger_total((?: \w+:{F})+)$")
RUNNING = _re(r"^Running (Python|PyTorch) (\S+)")
SOURCE_HEAD = re.compile(rb"source_file: (\S+) bytes:(\d+)")
# nvidia-smi table row: `|   0  NVIDIA H100 80GB HBM3          On  |   00000000:18:00.0 Off |  ...`
GPU_ROW = re.compile(r"^\|\s+\d+\s+(.+?)\s{2,}(?:On|Off)\s+\|")
KV = re.compile(r"(\w+):(\S+)")
NUMBER = re.compile(rf"^(?:{_F})$")


def parse_value(raw: str) -> Any:
    """Hyperparameter value as int / float / bool / None when it reads as one, else the string."""
    if re.fullmatch(r"[-+]?\d+", raw):
        return int(raw)
    if NUMBER.fullmatch(raw):
        return float(raw)
    return {"True": True, "False": False, "None": None}.get(raw, raw)


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


def _record_time_ms(step: int, minutes: float, tok_s: float, batch_tokens: int | None) -> tuple[float, bool]:
    """Train time of a record-format step line: exact from tok/s when it agrees with the printed minutes."""
    if batch_tokens and tok_s > 0 and step > 0:
        ms = round(step * batch_tokens / tok_s * 1000.0, 1)
        if abs(ms / 60000.0 - minutes) <= 0.0501:  # printed with .1f
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


def parse_log(text: str) -> dict[str, Any]:
    """Parse one log's text. Keys absent from the log are None (lists/dicts empty)."""
    sources, text, sources_error = split_sources(text)
    lines = [line.rstrip("\r") for line in text.splitlines()]
    header, body = split_header(lines)
    body = [line for line in body if not NOISE.match(line)]
    hp = parse_hyperparameters(body)
    if hp is None:
        hp = parse_hyperparameters(header)
    versions = {m.group(1): m.group(2) for m in map(RUNNING.match, header) if m}

    r: dict[str, Any] = {
        "format": None,
        "seed": None,
        "steps": None,
        "iterations": None,
        "stop_reason": None,
        "train_time_ms": None,
        "train_time_approx": None,
        "step_avg_ms": None,
        "final_label": None,
        "final_val_loss": None,
        "final_val_bpb": None,
        "bytes_code": None,
        "bytes_code_uncompressed": None,
        "bytes_model": None,
        "bytes_model_raw": None,
        "bytes_total": None,
        "artifact_scheme": None,
        "model_params": None,
        "world_size": None,
        "grad_accum_steps": None,
        "runtime": {},
        "train_shards": None,
        "val_tokens": None,
        "train_batch_tokens": None,
        "layer_loop_step": None,
        "gptq_reserve_s": None,
        "gptq_hessians_s": None,
        "peak_mem_allocated_mib": None,
        "peak_mem_reserved_mib": None,
        "total_eval_time_s": None,
        "python_version": versions.get("Python"),
        "torch_version": versions.get("PyTorch"),
        "gpus": [m.group(1) for m in map(GPU_ROW.match, header) if m],
        "sources": sources,
        "code_bytes_logged": sum(len(v.encode("utf-8")) for v in sources.values()) if sources else None,
        "sources_error": sources_error,
        "evals": {},
        "time_ledger": [],
        "time_totals": None,
        "hyperparameters": hp or {},
        "train": [],
        "val": [],
    }
    rec_train: list[tuple[int, float, float, float]] = []  # (step, loss, minutes, tok/s) before time recovery
    b_points: list[tuple[int, float]] = []  # baseline (step, ms) from train and val lines
    val_raw: list[tuple[int, float, float, float | None]] = []
    stop: tuple[str, float, int, int] | None = None
    ours_bytes: dict[str, int] = {}
    code_sizes: dict[str | None, int] = {}
    model_sizes: dict[str | None, int] = {}
    totals: list[tuple[str | None, int]] = []
    max_step, iters_seen, ledger_train_s, fmt = 0, None, None, None
    b_settings: tuple[int, int] | None = None

    for line in body:
        if m := REC_TRAIN.match(line):
            step = int(m.group(1))
            rec_train.append((step, float(m.group(3)), float(m.group(4)), float(m.group(5))))
            max_step, iters_seen, fmt = max(max_step, step), int(m.group(2)), fmt or "record"
        elif m := REC_VAL.match(line):
            step = int(m.group(1))
            val_raw.append((step, float(m.group(3)), float(m.group(4)), None))
            max_step, iters_seen = max(max_step, step), int(m.group(2))
        elif m := B_TRAIN.match(line):
            step = int(m.group(1))
            ms = float(m.group(4))
            r["train"].append({"step": step, "train_loss": float(m.group(3)), "train_time_ms": ms, "tok_s": None,
                               "time_approx": False})
            b_points.append((step, ms))
            max_step, iters_seen, fmt = max(max_step, step), int(m.group(2)), "baseline"
        elif m := B_VAL.match(line):
            step = int(m.group(1))
            val_raw.append((step, float(m.group(3)), float(m.group(4)), float(m.group(5))))
            b_points.append((step, float(m.group(5))))
            max_step, iters_seen, fmt = max(max_step, step), int(m.group(2)), "baseline"
        elif m := STOP.match(line):
            stop = (m.group(1), float(m.group(2)), int(m.group(3)), int(m.group(4)))
        elif m := EVAL.match(line):
            label = m.group(1)
            r["evals"].pop(label, None)  # a repeated label keeps its last value and position
            r["evals"][label] = {
                "val_loss": float(m.group(2)),
                "val_bpb": float(m.group(3)),
                "eval_time_ms": float(m.group(4)) if m.group(4) else None,
            }
        elif m := CODE_SIZE.match(line):
            code_sizes[m.group(1)] = int(m.group(2))
        elif m := SER_MODEL.match(line):
            model_sizes[m.group(1)] = int(m.group(2))
        elif m := TOTAL_SIZE.match(line):
            totals.append((m.group(1), int(m.group(2))))
        elif m := OUR_BYTES.match(line):
            ours_bytes[m.group(1)] = int(m.group(2))
            fmt = "ours"
        elif m := MODEL_PARAMS.match(line):
            r["model_params"] = int(m.group(1))
        elif m := WORLD.match(line):
            r["world_size"], r["grad_accum_steps"] = int(m.group(1)), int(m.group(2))
            r["runtime"] = {k: parse_value(v) for k, v in KV.findall(m.group(3))}
        elif m := TRAIN_SHARDS.match(line):
            r["train_shards"] = int(m.group(1))
        elif m := VAL_TOKENS.match(line):
            r["val_tokens"] = int(m.group(1))
        elif m := B_SEED.match(line):
            r["seed"] = int(m.group(1))
        elif m := B_SETTINGS.match(line):
            b_settings = (int(m.group(1)), int(m.group(2)))
        elif m := LAYER_LOOP.match(line):
            r["layer_loop_step"] = int(m.group(1))
        elif m := TOTAL_EVAL.match(line):
            r["total_eval_time_s"] = float(m.group(1))
        elif m := PEAK_MEM.match(line):
            r["peak_mem_allocated_mib"], r["peak_mem_reserved_mib"] = int(m.group(1)), int(m.group(2))
        elif m := GPTQ_RESERVE.match(line):
            r["gptq_reserve_s"] = float(m.group(1))
        elif m := GPTQ_HESS.match(line):
            r["gptq_hessians_s"] = float(m.group(2))
        elif m := LEDGER.match(line):
            seconds = float(m.group(2))
            r["time_ledger"].append({"phase": m.group(1), "seconds": seconds, "budget": m.group(3)})
            if m.group(1) == "train_loop":
                ledger_train_s = seconds
            fmt = "ours"
        elif m := LEDGER_TOTAL.match(line):
            r["time_totals"] = {k: float(v) for k, v in KV.findall(m.group(1))}
            fmt = "ours"

    # identity and scale
    if r["seed"] is None and isinstance(hp, dict) and isinstance(hp.get("seed"), int):
        r["seed"] = hp["seed"]
    if hp:
        for key in ("world_size", "grad_accum_steps"):
            if r[key] is None and isinstance(hp.get(key), int):
                r[key] = hp[key]
    tbt = hp.get("train_batch_tokens") if hp else None
    r["train_batch_tokens"] = tbt if isinstance(tbt, int) else (b_settings[0] if b_settings else None)
    hp_iters = hp.get("iterations") if hp else None
    if isinstance(hp_iters, int):
        r["iterations"] = hp_iters
    elif stop or iters_seen:
        r["iterations"] = stop[3] if stop else iters_seen
    elif b_settings:
        r["iterations"] = b_settings[1]
    r["format"] = fmt or ("record" if val_raw or r["evals"] else None)

    # curves: record-format times recovered from tok/s where possible
    points: list[TimePoint] = [(s, ms, 0) for s, ms in b_points]
    for step, loss, minutes, tok_s in rec_train:
        ms, approx = _record_time_ms(step, minutes, tok_s, r["train_batch_tokens"])
        r["train"].append({"step": step, "train_loss": loss, "train_time_ms": ms, "tok_s": tok_s,
                           "time_approx": approx})
        points.append((step, ms, 2 if approx else 1))
    if stop:
        points.append((stop[2], stop[1], 0))
    elif ledger_train_s is not None and max_step:
        points.append((max_step, ledger_train_s * 1000.0, 0))
    points.append((0, 0.0, 0))
    points.sort(key=lambda p: (p[0], p[2]))
    for step, loss, bpb, ms in val_raw:
        approx = False
        if ms is None:
            ms, approx = _interp_time(step, points)
        r["val"].append({"step": step, "val_loss": loss, "val_bpb": bpb, "train_time_ms": ms, "time_approx": approx})

    # totals of the training phase
    r["steps"] = stop[2] if stop else (max_step or None)
    if stop:
        r["train_time_ms"], r["train_time_approx"], r["stop_reason"] = stop[1], False, stop[0]
    elif ledger_train_s is not None:
        r["train_time_ms"], r["train_time_approx"] = ledger_train_s * 1000.0, False
    elif r["steps"]:
        last = max((p for p in points if p[0] > 0), key=lambda p: (p[0], -p[2]), default=None)
        if last is not None:
            scale = r["steps"] / last[0]  # the last timed line may precede the final step
            r["train_time_ms"], r["train_time_approx"] = last[1] * scale, last[2] == 2 or scale != 1.0
    if r["stop_reason"] is None and r["steps"] and r["steps"] == r["iterations"]:
        r["stop_reason"] = "iterations"
    if r["train_time_ms"] is not None and r["steps"]:
        r["step_avg_ms"] = r["train_time_ms"] / r["steps"]

    # final score: the last non-diagnostic eval line in pipeline (= log) order
    labels = list(r["evals"])
    headline = [lab for lab in labels if not lab.startswith("diagnostic")] or labels
    if headline:
        r["final_label"] = headline[-1]
        r["final_val_loss"] = r["evals"][headline[-1]]["val_loss"]
        r["final_val_bpb"] = r["evals"][headline[-1]]["val_bpb"]

    # bytes: our explicit lines > the scheme-qualified lines > the unqualified ones
    r["bytes_code_uncompressed"] = code_sizes.get("uncompressed")
    code = code_sizes.get("compressed", code_sizes.get(None))
    r["bytes_code"] = ours_bytes.get("code", code)
    r["bytes_model_raw"] = model_sizes.get(None)
    schemed_models = [v for k, v in model_sizes.items() if k is not None]
    r["bytes_model"] = ours_bytes.get("model", schemed_models[-1] if schemed_models else None)
    schemed = [t for t in totals if t[0] is not None]
    if schemed:
        r["artifact_scheme"] = schemed[-1][0]
    total = schemed[-1][1] if schemed else (totals[-1][1] if totals else None)
    r["bytes_total"] = ours_bytes.get("total", total)
    return r


def _json_safe(obj: Any) -> Any:
    """Non-finite floats (a diverged loss) become null so every output line is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def read_log(path: Path) -> str:
    """Log text, byte-exact (no newline translation: the source frames count bytes); raises FileNotFoundError /
    IsADirectoryError with the path for the CLI's one-line error."""
    if not path.exists():
        raise FileNotFoundError(f"no such log file: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"is a directory, not a log file: {path}")
    return path.read_bytes().decode("utf-8", errors="replace")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Parse training logs (ours, upstream records, root baseline) to JSON.")
    ap.add_argument("logs", nargs="+", type=Path, help="log files (logs/<RUN_ID>.txt, train_seed42.log, ...)")
    ap.add_argument("--no-curves", action="store_true", help="omit the per-step train/val curves from the output")
    args = ap.parse_args(argv)
    try:
        texts = [read_log(p) for p in args.logs]
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path, text in zip(args.logs, texts, strict=True):
        parsed = parse_log(text)
        if parsed["format"] is None:
            print(f"warning: {path}: no recognizable log lines", file=sys.stderr)
        if args.no_curves:
            del parsed["train"], parsed["val"]
        parsed["sources"] = {name: len(src.encode("utf-8")) for name, src in parsed["sources"].items()}  # not the text
        print(json.dumps(_json_safe({"log": str(path), **parsed})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
