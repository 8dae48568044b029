"""Shared helpers of the benchmarks: markdown tables, medians, the machine line, and trainer runs in subprocesses.

Benchmarks print their result tables (markdown) on stdout and progress on stderr, so `bench/report.py` can paste a
bench's stdout into BENCHMARKS.md as it is.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tools.envfile import read_env_file
from tools.log_parser import parse_log
from tools.safe_io import read_log

ROOT = Path(__file__).resolve().parent.parent

TINY_ENV = ROOT / "configs" / "cpu_tiny.env"
RUNS = ROOT / "runs" / "bench"


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (the mean of the middle two for an even count)."""
    if not values:
        raise ValueError("median of an empty sequence")
    return float(statistics.median(values))


def md_table(head: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A markdown pipe table padded to aligned columns (readable as plain text too). `align` has one letter per
    column, 'l' or 'r' (default: first column left, the rest right)."""
    align = align or "l" + "r" * (len(head) - 1)
    if len(align) != len(head) or any(len(r) != len(head) for r in rows):
        raise ValueError(f"md_table: {len(head)} columns, align {align!r}, row lengths {[len(r) for r in rows]}")
    cells = [[str(c) for c in head], *[[str(c) for c in r] for r in rows]]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, align)) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + (":" if a == "r" else "-") for w, a in zip(widths, align)) + " |"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def spread(values: Sequence[float], fmt: str = ".3g") -> str:
    """'median (min–max, n=k)' of a sample; the range shows how much the machine drifted."""
    if len(values) == 1:
        return f"{values[0]:{fmt}} (n=1)"
    return f"{median(values):{fmt}} ({min(values):{fmt}}–{max(values):{fmt}}, n={len(values)})"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    import torch
    return (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def progress(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the result tables."""
    print(msg, file=sys.stderr, flush=True)


def tiny_env() -> dict[str, str]:
    """configs/cpu_tiny.env as a dict."""
    return read_env_file(TINY_ENV)


def config_env_names() -> set[str]:
    import train_gpt as tg
    return {f.name.upper() for f in dataclasses.fields(tg.Config)}


@dataclasses.dataclass(frozen=True)
class TrainerRun:
    out_dir: Path
    summary: dict[str, Any]  # run_summary.json
    log: dict[str, Any]  # tools/parse_log.py of logs/<RUN_ID>.txt
    wall_s: float  # the whole process, startup to exit

    @property
    def ledger(self) -> dict[str, float]:
        return {row["phase"]: row["seconds"] for row in self.summary["time_ledger"]}

    @property
    def train_tok_s(self) -> float:
        """Training tokens per second of the timed loop: steps x TRAIN_BATCH_TOKENS / train time (ledger)."""
        return self.summary["steps"] * self.summary["config"]["train_batch_tokens"] / self.ledger["train_loop"]

    def bpb(self, label: str) -> float:
        return self.summary["evals"][label]["val_bpb"]


def run_trainer(out_dir: Path, overrides: dict[str, str], label: str, extra_env: dict[str, str] | None = None,
                script: str = "train_gpt.py") -> TrainerRun:
    """`python <script>` (train_gpt.py or an experiment's entry script) with configs/cpu_tiny.env + overrides in a
    clean environment (config variables of the calling shell are dropped, so only what is written here counts).
    Console output goes to OUT_DIR/console.txt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = config_env_names()
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update({**tiny_env(), **overrides, "OUT_DIR": str(out_dir), "RUN_ID": out_dir.name, **(extra_env or {})})
    console = out_dir / "console.txt"
    progress(f"  {label}: python {script} -> {out_dir.relative_to(ROOT) if out_dir.is_relative_to(ROOT) else out_dir}")
    t = time.perf_counter()
    with open(console, "w") as f:
        code = subprocess.run([sys.executable, str(ROOT / script)], cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t
    if code != 0:
        tail = console.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise SystemExit(f"bench: trainer run {label} failed (exit {code}): {tail[0]} (see {console})")
    summary = json.loads((out_dir / "run_summary.json").read_text())
    run = TrainerRun(out_dir, summary, parse_log(read_log(Path(summary["log"]))), wall)
    progress(f"    {summary['steps']} steps, {run.train_tok_s:,.0f} tok/s, "
             f"final {summary['final_label']} val_bpb {summary['final_val_bpb']:.4f}, {wall:.0f}s wall")
    return run


def stamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S")
