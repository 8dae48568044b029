"""One parser per log-line kind (docs/log_format.md).

Our own lines are parsed with regular expressions built from the very format strings the trainer writes them with
(`train_gpt.LOG_FORMATS`), so a format change in the trainer changes the parser with it. Upstream lines that differ
from ours (the root baseline's `step:` lines, N's `Code size (compressed)`, `total_eval_time:`) keep hand-written
patterns. Score lines (`<label> val_loss:… val_bpb:…`) get a tolerant parser of their own: upstream writes labels
with `key:value` attributes, text after the bpb, and a float timestamp before the whole line.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any

from train_gpt import LOG_FORMATS

F = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf"
NUMBER = re.compile(rf"^(?:{F})$")
# field name -> pattern, where the generic rule (float spec -> number, else lazy text) is not precise enough
FIELD_PATTERNS = {
    "step": r"\d+", "iterations": r"\d+", "n": r"\d+", "k": r"\d+", "world_size": r"\d+", "accum": r"\d+",
    "allocated": r"\d+", "reserved": r"\d+", "done": r"\d+", "wanted": r"\d+", "docs": r"\d+", "prefix": r"\d+",
    "suffix": r"\d+", "phases": r"\d+", "scored": r"\d+",
    "vocab": r"\d+", "cpus": r"\d+", "sha256": r"[0-9a-f]{64}", "name": r"\S+", "phase": r"\S+", "budget": r"\S+",
    "codec": r"\S+", "part": r"[a-z]+", "device": r"\S+", "attention": r"\S+", "compile": r"\S+", "precision": r"\S+",
}
INT_FIELDS = {k for k, v in FIELD_PATTERNS.items() if v == r"\d+"}


def _literal(text: str) -> str:
    """A format's literal text as a pattern: `: ` also matches `:` (the baseline writes `train_time:600038ms`)."""
    out = []
    for part in re.split(r"( +)", text):
        if part.startswith(" "):
            out.append(r"\s*" if out and out[-1].endswith(":") else r"\s+")
        elif part:
            out.append(re.escape(part))
    return "".join(out)


def format_regex(fmt: str) -> re.Pattern[str]:
    """The full-line pattern of a str.format template: one named group per field."""
    parts = []
    for literal, name, spec, _ in string.Formatter().parse(fmt):
        parts.append(_literal(literal))
        if name is not None:
            pattern = FIELD_PATTERNS.get(name) or (f"(?:{F})" if spec and spec[-1] in "efgEFG%" else r".+?")
            parts.append(f"(?P<{name}>{pattern})")
    return re.compile("^" + "".join(parts) + "$")


def format_fields(fmt: str) -> dict[str, str]:
    """Field name -> its format spec ('' when none)."""
    return {name: spec or "" for _, name, spec, _ in string.Formatter().parse(fmt) if name is not None}


def convert(name: str, spec: str, raw: str) -> Any:
    """A matched field as the type the trainer formatted: int, float, or the text."""
    if name in INT_FIELDS:
        return int(raw)
    if spec and spec[-1] in "efgEFG%":
        return float(raw)
    return raw if name in FIELD_PATTERNS else parse_value(raw)  # a hash or a name stays text


def parse_value(raw: str) -> Any:
    """Hyperparameter value as int / float / bool / None when it reads as one, else the string."""
    if re.fullmatch(r"[-+]?\d+", raw):
        return int(raw)
    if NUMBER.fullmatch(raw):
        return float(raw)
    return {"True": True, "False": False, "None": None}.get(raw, raw)


OURS = {kind: format_regex(fmt) for kind, fmt in LOG_FORMATS.items() if kind not in ("eval", "warmup", "source_file")}
OURS_FIELDS = {kind: format_fields(fmt) for kind, fmt in LOG_FORMATS.items()}


def match_ours(kind: str, line: str) -> dict[str, Any] | None:
    """The typed fields of one of our line kinds, or None."""
    m = OURS[kind].match(line)
    if not m:
        return None
    specs = OURS_FIELDS[kind]
    return {k: convert(k, specs.get(k, ""), v) for k, v in m.groupdict().items()}


def _re(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern.replace("{F}", f"(?:{F})"))


# upstream shapes that are not ours
UPSTREAM = {
    "b_train": _re(r"^step:(\d+)/(\d+) train_loss:({F}) train_time:({F})ms step_avg:({F})ms$"),
    "b_val": _re(r"^step:(\d+)/(\d+) val_loss:({F}) val_bpb:({F}) train_time:({F})ms step_avg:({F})ms$"),
    "code_size": _re(r"^Code size(?: \((uncompressed|compressed)\))?: (\d+) bytes$"),
    "ser_model": _re(r"^Serialized model(?: (\S+))?: (\d+) bytes\b"),
    "total_size": _re(r"^Total submission size(?: (\S+))?: (\d+) bytes$"),
    "world": _re(r"^world_size: ?(\d+) grad_accum_steps: ?(\d+)(.*)$"),
    "train_shards": _re(r"^(?:train_shards: |train_loader:\S* train_shards:)(\d+)$"),
    "val_tokens": _re(r"^(?:val_tokens: |val_loader:.* tokens:)(\d+)$"),
    "seed": _re(r"^seed:(\d+)$"),
    "settings": _re(r"^train_batch_tokens:(\d+) .*\biterations:(\d+)\b"),
    "layer_loop": _re(r"^layer_loop:enabled step: ?(\d+)"),
    "total_eval": _re(r"^total_eval_time: ?({F})s$"),
    "model_params": _re(r"^model_params: ?(\d+)$"),
}
# torchrun / c10d / NCCL noise (`W0409 04:38:18.092000 206 torch/...`, `[rank0]:[W318 ...]`, `[W318 ...]`)
NOISE = _re(r"^(?:[WIEF]\d{4} \d\d:\d\d:\d\d|\[rank\d+\]:|\[[WIEF]\d{3,4} )")
# a unix timestamp some loggers put before every line: `1776142356.999 quantized_ttt_phased val_loss:...`; exactly
# one space goes with it (the hyperparameter dump's `  key: value` keeps its indent)
TIMESTAMP = re.compile(r"^\d{9,11}(?:\.\d+)? ")
EVAL = _re(r"^(?P<label>\S.*?)\s+val_loss:\s*(?P<loss>{F})\s+val_bpb:\s*(?P<bpb>{F})(?P<rest>.*)$")
EVAL_TIME = _re(r"\beval_time:\s*(?P<ms>{F})ms\b")
STEP_PREFIX = re.compile(r"^(?:step:)?\d+/\d+$")
ATTR = re.compile(r"\s+(\w+)[:=](\S+)$")
KV = re.compile(r"(\w+):(\S+)")
RUNNING = re.compile(r"^Running (Python|PyTorch) (\S+)")
# nvidia-smi table row: `|   0  NVIDIA H100 80GB HBM3          On  |   00000000:18:00.0 Off |  ...`
GPU_ROW = re.compile(r"^\|\s+\d+\s+(.+?)\s{2,}(?:On|Off)\s+\|")
# Labels of scores that are not the artifact's: the float model before quantization, declared diagnostics, and the
# hybrid experiment's forced-gate scores (quantized_gate1 / quantized_gate0: the model with its gate overridden).
NOT_SUBMITTABLE = re.compile(r"^diagnostic\b|pre[-_ ]?quant|post[-_ ]ema(?!.*quant)|_gate[01]$", re.I)


def clean_line(line: str) -> str:
    """A log line without its carriage return and leading timestamp."""
    return TIMESTAMP.sub("", line.rstrip("\r"))


@dataclass
class EvalLine:
    label: str  # the text before val_loss, attributes included (`final_sliding_window_eval_exact stride:64`)
    name: str  # the label without trailing key:value attributes
    val_loss: float
    val_bpb: float
    eval_time_ms: float | None
    attrs: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # what followed the bpb, eval_time removed (`(stride=16, T=0.90)`)


def parse_eval(line: str) -> EvalLine | None:
    """A score line of any shape seen upstream, or None (step-numbered val lines are not score lines)."""
    m = EVAL.match(line)
    if not m or STEP_PREFIX.match(m["label"]):
        return None
    label, rest = m["label"].strip(), m["rest"]
    name, attrs = label, {}
    while a := ATTR.search(name):
        attrs[a[1]] = parse_value(a[2])
        name = name[: a.start()]
    t = EVAL_TIME.search(rest)
    note = (rest[: t.start()] + rest[t.end():]).strip() if t else rest.strip()
    return EvalLine(label, name, float(m["loss"]), float(m["bpb"]), float(t["ms"]) if t else None,
                    dict(reversed(attrs.items())), note)


def submittable(label: str) -> bool:
    """Whether a score line can be the submitted score (it scores the artifact, not the float model)."""
    return not NOT_SUBMITTABLE.search(label)
