"""submission.json and README.md of a record folder, generated from its runs (docs/records.md)."""

from __future__ import annotations

import json
import re
import statistics
from typing import Any

from tools.record_runs import Run
from train_gpt import ARTIFACT_LIMIT_BYTES, TIME_LIMIT_SECONDS


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _r(x: float | None, nd: int = 8) -> float | None:
    return None if x is None else round(x, nd)


def compliance(runs: list[Run], bytes_code: int) -> dict[str, bool | None]:
    """The P-style compliance block, from the logs. score_first_ttt is None when no TTT ran."""
    hps = [r.parsed["hyperparameters"] for r in runs]
    labels = [label for r in runs for label in r.parsed["evals"]]

    def flag_off(word: str) -> bool:  # no enabled hyperparameter mentions the technique
        return not any(word in k.lower() and v not in (False, 0, None, "", "0") for hp in hps for k, v in hp.items())

    ttt_ran = any("ttt" in label for label in labels)
    return {
        "train_under_600s": all(r.parsed["time_totals"]["train"] <= TIME_LIMIT_SECONDS for r in runs),
        "eval_under_600s": all(r.parsed["time_totals"]["eval"] <= TIME_LIMIT_SECONDS for r in runs),
        "artifact_under_16mb": all(bytes_code + r.artifact_bytes <= ARTIFACT_LIMIT_BYTES for r in runs),
        # the phased TTT scores each chunk before the update that trains on it (tests/test_ttt.py, tests/test_eval.py)
        "score_first_ttt": True if ttt_ran else None,
        "no_slot": flag_off("slot"),
        "no_pre_quant_ttt": not any("ttt" in label and not label.startswith("quantized") for label in labels),
        "no_etlb": flag_off("etlb"),
        "no_ngram_cache": flag_off("ngram"),
        "three_seeds": len(runs) >= 3,
    }


def submission(runs: list[Run], args: Any, bytes_code: int, hw: str, entry: str | None = None) -> dict[str, Any]:
    """submission.json; `entry`: the experiment entry script the runs ran (experiments/<name>.py), if any."""
    bpbs = [r.parsed["final_val_bpb"] for r in runs]
    losses = [r.parsed["final_val_loss"] for r in runs]
    arts = [r.artifact_bytes for r in runs]
    bpb, bpb_std = _mean_std(bpbs)
    loss, loss_std = _mean_std(losses)
    torch_versions = sorted({r.parsed["torch_version"] or "unknown" for r in runs})
    return {
        "author": args.author,
        "github_id": args.github_id,
        "name": args.name,
        "date": args.date,
        "track": args.track,
        "blurb": args.blurb or args.name,
        **({"entry": entry} if entry else {}),
        "val_bpb": _r(bpb),
        "val_bpb_std": _r(bpb_std),
        "val_loss": _r(loss),
        "val_loss_std": _r(loss_std),
        "seeds": [r.seed for r in runs],
        "seed_results": {str(r.seed): {
            "val_bpb": r.parsed["final_val_bpb"],
            "val_loss": r.parsed["final_val_loss"],
            "artifact_bytes": r.artifact_bytes,
            "steps": r.parsed["steps"],
            "step_avg_ms": _r(r.parsed["step_avg_ms"], 2),
            "train_time_s": r.parsed["time_totals"]["train"],
            "eval_time_s": r.parsed["time_totals"]["eval"],
        } for r in runs},
        "bytes_code": bytes_code,
        "bytes_total": max(bytes_code + a for a in arts),
        "artifact_bytes_mean": _r(statistics.fmean(arts), 1),
        "artifact_bytes_max": max(arts),
        "hardware": hw,
        "pytorch_version": ", ".join(torch_versions),
        "compliance": compliance(runs, bytes_code),
        **({"tokenizer_sha256": toks.pop()} if len(toks := {r.parsed.get("tokenizer_sha256") for r in runs}) == 1
           and None not in toks else {}),
    }


def included_files_section(files: list[str]) -> str:
    """README's `## Included files` section for the files a folder actually holds (tools/submit.py rewrites it)."""
    what = {
        "train_gpt.py": "the packed script that ran and is counted (lzma + base85 self-extracting)",
        "train_gpt_readable.py": "the same code, readable (data/shards.py and quant/ inlined; AST-equivalent to the "
                                 "packed file)",
        "submission.json": "results and metadata, generated from the logs",
        "requirements.txt": "Python packages",
        "README.md": "this file",
    }
    lines = []
    for f in files:
        if f in what:
            lines.append(f"- `{f}`: {what[f]}")
        elif m := re.fullmatch(r"train_seed(\d+)\.log", f):
            lines.append(f"- `{f}`: training log of seed {m[1]} (starts with the source that ran)")
        elif m := re.fullmatch(r"final_model_seed(\d+)\.int6\.ptz", f):
            lines.append(f"- `{f}`: the quantized artifact of seed {m[1]}")
        else:
            lines.append(f"- `{f}`")
    return "## Included files\n\n" + "\n".join(lines) + "\n"


def _entry_note(entry: str | None) -> list[str]:
    if not entry:
        return []
    return ["", f"Entry: `{entry}`, an experiment on top of pgolf's trainer. The packed `train_gpt.py` holds it with "
            f"everything it imports (train_gpt.py, data/shards.py, evals/, quant/) in one file, and runs it."]


def readme(sub: dict[str, Any], runs: list[Run], overrides: dict[str, str], files: list[str], readable_bytes: int,
           world_size: int, entry: str | None = None) -> str:
    def cell(r: Run, label: str) -> float | None:
        return r.parsed["evals"].get(label, {}).get("val_bpb")

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None else format(x, spec)

    cols = [("pre-quantization post-ema", "Pre-quant"), ("quantized", "Quantized"),
            ("quantized_sliding_window", "Sliding"), ("quantized_ttt_phased", "TTT")]
    n = len(runs)
    title = "Record" if sub["track"] == "10min_16mb" else "Non-record"
    std = f"std {sub['val_bpb_std']:.4f}" if sub["val_bpb_std"] is not None else "std n/a"
    out = [f"# {title}: {sub['name']}", "",
           f"**val_bpb = {sub['val_bpb']:.4f} ({n}-seed mean, {std}) | {sub['bytes_total'] / 1e6:.2f} MB | "
           f"{sub['hardware']}**", "", sub["blurb"], "",
           f"Track `{sub['track']}`, {sub['date']}, by {sub['author']} (@{sub['github_id']}). "
           f"Final score: `{runs[0].parsed['final_label']}`.", *_entry_note(entry), "", "## Results", "",
           "| Seed | Steps | ms/step | " + " | ".join(c[1] for c in cols) + " | Artifact bytes |",
           "|---:|---:|---:|" + "---:|" * len(cols) + "---:|"]
    for r in runs:
        out.append(f"| {r.seed} | {r.parsed['steps']} | {fmt(r.parsed['step_avg_ms'], '.2f')} | "
                   + " | ".join(fmt(cell(r, c[0]), ".8f") for c in cols) + f" | {r.artifact_bytes:,} |")
    for name, fn in (("Mean", statistics.fmean), ("Std", statistics.stdev)):
        if name == "Std" and n < 2:
            break

        def agg(values: list[float | None], spec: str, fn=fn) -> str:
            return "-" if None in values else format(fn(values), spec)
        out.append(f"| **{name}** | {agg([r.parsed['steps'] for r in runs], '.0f')} | "
                   f"{agg([r.parsed['step_avg_ms'] for r in runs], '.2f')} | "
                   + " | ".join(agg([cell(r, c[0]) for r in runs], ".8f") for c in cols)
                   + f" | {agg([float(r.artifact_bytes) for r in runs], ',.0f')} |")
    c = sub["compliance"]
    ttt = c["score_first_ttt"]
    out += ["", "## Compliance", "",
            "The four conditions of issue #1017 (\"A Field Guide to Valid Submissions\"):", "",
            "1. **Causality**: every position is scored from its prefix only (causal attention; the sliding window "
            "only adds left context).",
            "2. **Normalized distribution**: a full softmax over the whole vocabulary; no n-gram cache, no logit "
            "bias (ETLB), no SLOT.",
            "3. **Score before update**: " + ("record N's phased score-first TTT: each chunk of a document is scored "
                                              "and added to the totals before the adapter step that trains on it, and "
                                              "the global phases train only on documents already scored."
                                              if ttt else "no test-time training; the artifact's weights never "
                                              "change during eval."),
            "4. **Single pass**: each val token is scored exactly once in the reported stage; no rescoring.", "",
            "| Seed | Train s (loop + Hessians) | Eval s (sliding + TTT) | Code + artifact bytes |",
            "|---:|---:|---:|---:|"]
    for r in runs:
        t = r.parsed["time_totals"]
        out.append(f"| {r.seed} | {t['train']:.1f} | {t['eval']:.1f} | {sub['bytes_code'] + r.artifact_bytes:,} |")
    out += ["", f"Limits: train ≤ 600 s, eval ≤ 600 s, code + artifact ≤ 16,000,000 bytes on every seed. "
            f"Code is the packed `train_gpt.py` ({sub['bytes_code']:,} bytes; the readable source is "
            f"{readable_bytes:,} bytes). Checks: " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in c.items()) + ".",
            "", "## Reproduce", "",
            "```bash", f"SEED={runs[0].seed} torchrun --standalone --nproc_per_node={world_size} train_gpt.py", "```",
            "", f"Seeds run: {', '.join(str(r.seed) for r in runs)}."]
    if overrides:
        env = " ".join(f"{k}={v}" for k, v in overrides.items())
        out += ["", "These runs used env overrides: the record's Config defaults differ from what ran. "
                "To rerun exactly what was measured:", "", "```bash",
                f"{env} SEED={runs[0].seed} torchrun --standalone --nproc_per_node={world_size} train_gpt.py", "```"]
    if entry:
        out += ["", f"From a pgolf checkout the same code runs as the entry script: `SEED={runs[0].seed} torchrun "
                f"--standalone --nproc_per_node={world_size} {entry}`."]
    out += ["", included_files_section(files)]
    return "\n".join(out)
