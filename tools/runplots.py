"""Compare training runs: the final-number table and the 2x2 curves figure (tools/compare_runs.py is the command).

Runs come from tools.log_parser.parse_log. Stage names are normalized so the same eval stage lands in one column
whatever a record calls it ("diagnostic pre-quantization post-ema" and "pre-quantization post-ema" are one stage).
Losses of runs on different tokenizers are not comparable (nats per token of different tokens): the table and the
figure say so whenever the runs' vocab sizes or tokens/byte differ.
"""

from __future__ import annotations

import os
import re
import statistics
import textwrap
from pathlib import Path
from typing import Any

MAX_LABEL = 18
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}_?")  # record folders start with their date


def stage_key(label: str) -> str:
    """One column per eval stage: lower case, '_' as ' ', a 'diagnostic ' prefix dropped."""
    key = re.sub(r"[\s_]+", " ", label.strip().lower())
    return key.removeprefix("diagnostic ").strip()


def default_labels(paths: list[Path]) -> list[str]:
    """Short labels: the file stems with their common prefix and suffix removed (parent/stem when stems collide),
    cut to MAX_LABEL characters; numbered when that leaves duplicates or nothing."""
    stems = [p.stem for p in paths]
    if len(set(stems)) < len(stems):  # train_seed42.log of two records: the record folder, without its date
        stems = [DATE.sub("", p.parent.name) + "/" + p.stem for p in paths]
        if len(set(stems)) == len(stems):
            stems = [s.split("/")[0] if len({x.split("/")[1] for x in stems}) == 1 else s for s in stems]
    if len(stems) > 1:
        pre = os.path.commonprefix(stems)
        suf = os.path.commonprefix([s[::-1] for s in stems])[::-1]
        trimmed = [s[len(pre) : len(s) - len(suf)] for s in stems]
        if all(trimmed):
            stems = trimmed
    labels = [s if len(s) <= MAX_LABEL else s[: MAX_LABEL - 1] + "~" for s in stems]
    if len(set(labels)) < len(labels):
        labels = [f"{i + 1}:{lab}" for i, lab in enumerate(labels)]
    return labels


def tokens_per_byte(run: dict[str, Any]) -> float | None:
    """From the run's final eval line: bpb = loss / ln 2 x tokens/byte."""
    loss, bpb = run.get("final_val_loss"), run.get("final_val_bpb")
    if not loss or not bpb:
        return None
    return bpb * 0.6931471805599453 / loss


def vocab_size(run: dict[str, Any]) -> int | None:
    v = (run.get("hyperparameters") or {}).get("vocab_size")
    return int(v) if isinstance(v, (int, float)) else None


def tokenizer_warning(labels: list[str], runs: list[dict[str, Any]]) -> str | None:
    """A one-line warning when the runs' tokenizers differ (vocab size, or tokens/byte by more than 1%)."""
    vocabs = {lab: vocab_size(r) for lab, r in zip(labels, runs)}
    tpb = {lab: tokens_per_byte(r) for lab, r in zip(labels, runs)}
    known_v = {v for v in vocabs.values() if v is not None}
    known_t = [t for t in tpb.values() if t is not None]
    if len(known_v) > 1 or (known_t and max(known_t) / min(known_t) > 1.01):
        parts = [f"{lab} vocab {vocabs[lab] or '?'}, {tpb[lab]:.3f} tok/byte" if tpb[lab] else f"{lab} vocab "
                 f"{vocabs[lab] or '?'}" for lab in labels]
        return ("WARNING: different tokenizers (" + "; ".join(parts) + "): train/val losses are nats per token of "
                "different tokens and are not comparable; compare val_bpb")
    return None


def stage_columns(runs: list[dict[str, Any]]) -> list[str]:
    """Normalized stage keys over all runs, each run's pipeline order kept, first-seen order across runs."""
    out: list[str] = []
    for run in runs:
        out += [k for k in map(stage_key, run["evals"]) if k not in out]
    return out


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(labels: list[str], runs: list[dict[str, Any]]) -> str:
    stages = stage_columns(runs)
    head = ["run", "seed", "steps", "ms/step", "bytes_total", *stages]
    rows = []
    for label, run in zip(labels, runs, strict=True):
        by_key = {stage_key(k): v for k, v in run["evals"].items()}
        final = stage_key(run["final_label"]) if run["final_label"] else None
        rows.append([label, _fmt(run["seed"], "d"), _fmt(run["steps"], "d"),
                     _fmt(run["step_avg_ms"], ".2f") + ("~" if run["train_time_approx"] else ""),
                     _fmt(run["bytes_total"], ",d"),
                     *[_fmt(by_key.get(s, {}).get("val_bpb"), ".5f") + ("*" if s == final else " ") for s in stages]])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = ["* = the run's final (headline) stage; stage names normalized ('diagnostic ' prefix dropped)"]
    if any(run["train_time_approx"] for run in runs):
        notes.append("~ = train time estimated from minute-resolution step lines")
    warning = tokenizer_warning(labels, runs)
    if warning:
        notes.append(warning)
    single = [lab for lab, run in zip(labels, runs) if len(run["val"]) == 1]
    if single:
        notes.append("single val point (drawn as a marker): " + ", ".join(single))
    return "\n".join(lines + notes)


def focus_ylim(values: list[float]) -> tuple[float, float] | None:
    """Y range that shows the late-training spread instead of the step-0 spike (loss 9 vs 3)."""
    vals = [v for v in values if v == v and abs(v) != float("inf")]
    if len(vals) < 2:
        return None
    lo, med = min(vals), statistics.median(vals)
    hi = min(max(vals), med + 3.0 * (med - lo))
    if hi <= lo:
        return None
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


def plot_runs(labels: list[str], runs: list[dict[str, Any]], out: Path) -> None:
    """Write the 2x2 figure to `out` atomically: one legend outside the axes, the tokenizer warning and the
    single-point note under the title, single-point series as large markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = {}
    for row, (curve, key, name) in enumerate((("train", "train_loss", "train loss"), ("val", "val_bpb", "val bpb"))):
        for col, xname in enumerate(("step", "train wallclock (min)")):
            ax = axes[row][col]
            ys_all: list[float] = []
            for i, (label, run) in enumerate(zip(labels, runs, strict=True)):
                pts = run[curve] if col == 0 else [p for p in run[curve] if p["train_time_ms"] is not None]
                xs = [p["step"] if col == 0 else p["train_time_ms"] / 60000.0 for p in pts]
                ys = [p[key] for p in pts]
                if not xs:
                    continue
                style = dict(marker="D", markersize=9, linestyle="none") if len(xs) == 1 else dict(
                    marker="o" if curve == "val" else None, markersize=3)
                (h,) = ax.plot(xs, ys, color=colors[i % len(colors)], label=label, **style)
                handles.setdefault(label, h)
                ys_all += ys
            ylim = focus_ylim(ys_all)
            if ylim:
                ax.set_ylim(*ylim)
            ax.set_xlabel(xname)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
    notes = ["train loss and val bpb (y clipped to the late-training range)"]
    warning = tokenizer_warning(labels, runs)
    if warning:
        notes.append(textwrap.fill(warning, 140))
    single = [lab for lab, run in zip(labels, runs) if len(run["val"]) == 1]
    if single:
        notes.append("one val point only (diamond): " + ", ".join(single))
    text = "\n".join(notes)
    fig.suptitle(text, fontsize=9, color="black" if not warning else "firebrick")
    fig.legend(list(handles.values()), list(handles), loc="center left", bbox_to_anchor=(0.86, 0.5), fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 0.85, 1.0 - 0.028 * (text.count("\n") + 2)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # same directory, so os.replace is atomic
    try:
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
