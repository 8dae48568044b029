"""Finished runs as record inputs: a run directory's log and artifact, the code every seed ran, the Config overrides
they used and the hardware they ran on."""

from __future__ import annotations

import ast
import contextlib
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.log_parser import parse_log
from tools.record_pack import RecordError, _parse
from tools.safe_io import read_log

RUN_BOOKKEEPING = {"seed", "run_id", "out_dir"}  # Config fields that differ per run and do not change the result


@dataclass
class Run:
    log_path: Path
    artifact_path: Path
    parsed: dict[str, Any]

    @property
    def seed(self) -> int:
        return self.parsed["seed"]

    @property
    def artifact_bytes(self) -> int:
        return self.artifact_path.stat().st_size


def run_from_dir(out_dir: Path) -> tuple[Path, Path]:
    """(log, artifact) of a run directory in our layout."""
    if not out_dir.is_dir():
        raise RecordError(f"--run {out_dir}: not a directory")
    logs = sorted((out_dir / "logs").glob("*.txt"))
    if len(logs) != 1:
        raise RecordError(f"--run {out_dir}: expected exactly one logs/*.txt, found {len(logs)}")
    for name in ("final_model.int6.ptz", "run_summary.json"):
        if not (out_dir / name).is_file():
            raise RecordError(f"--run {out_dir}: no {name} (did the run finish?)")
    return logs[0], out_dir / "final_model.int6.ptz"


def load_run(log: Path, artifact: Path) -> Run:
    try:
        parsed = parse_log(read_log(log))
    except OSError as e:
        raise RecordError(str(e)) from None
    if not artifact.is_file():
        raise RecordError(f"artifact {artifact}: no such file")
    missing = [k for k in ("seed", "final_val_bpb", "bytes_model", "time_totals") if parsed[k] is None]
    if missing:
        raise RecordError(f"{log}: no {', '.join(missing)} in the log (an unfinished run, or not our log format)")
    if parsed["sources_error"]:
        raise RecordError(f"{log}: {parsed['sources_error']}")
    if not parsed["sources"]:
        raise RecordError(f"{log}: the log holds no `source_file:` frames, so the code that ran is unknown")
    if artifact.stat().st_size != parsed["bytes_model"]:
        raise RecordError(f"{artifact} has {artifact.stat().st_size} bytes but {log} logged bytes_model:"
                          f"{parsed['bytes_model']}: not this run's artifact")
    return Run(log, artifact, parsed)


def common_sources(runs: list[Run]) -> dict[str, str]:
    """The sources every seed ran (identical across seeds, else RecordError naming the file)."""
    first = runs[0]
    for run in runs[1:]:
        for name in sorted(set(first.parsed["sources"]) | set(run.parsed["sources"])):
            a, b = first.parsed["sources"].get(name), run.parsed["sources"].get(name)
            if a != b:
                what = "is missing from one of them" if a is None or b is None else "differs"
                raise RecordError(f"seed {run.seed} ({run.log_path}) and seed {first.seed} ({first.log_path}) ran "
                                  f"different code: {name} {what}")
    return first.parsed["sources"]


def config_defaults(src: str) -> dict[str, Any]:
    """Literal defaults of the Config dataclass fields in a train_gpt.py source (read from its AST, not run)."""
    tree = _parse(src, "train_gpt.py")
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config"), None)
    if cls is None:
        raise RecordError("train_gpt.py has no Config class")
    out: dict[str, Any] = {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            with contextlib.suppress(ValueError):
                out[node.target.id] = ast.literal_eval(node.value)
    return out


def _literal_fields(cls: ast.ClassDef) -> tuple[list[str], dict[str, Any]]:
    """(field names, literal defaults) of a dataclass body."""
    names, out = [], {}
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
            if node.value is not None:
                with contextlib.suppress(ValueError):
                    out[node.target.id] = ast.literal_eval(node.value)
    return names, out


def experiment_config(src: str) -> tuple[list[str], dict[str, Any]]:
    """An entry script's config, read from the AST of a packed record's readable source: (the fields its Config
    subclasses add to Config, the literal defaults they set, new or overridden). ([], {}) without such a subclass."""
    tree = _parse(src, "train_gpt.py")
    base = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config"), None)
    own = set(_literal_fields(base)[0]) if base else set()
    family, added, defaults = {"Config"}, [], {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node is not base and any(
                (isinstance(b, ast.Name) and b.id in family) or ast.unparse(b) == "train_gpt.Config" for b in node.bases):
            family.add(node.name)
            names, values = _literal_fields(node)
            added += [n for n in names if n not in own and n not in added]
            defaults.update(values)
    return added, defaults


def smoke_env_of(run: Run, fields: list[str]) -> dict[str, str]:
    """The run's own values of an experiment's added Config fields, as env vars for the smoke run (scalars only; a
    field of another type keeps its default there)."""
    hp = run.parsed["hyperparameters"]
    return {k.upper(): (("1" if hp[k] else "0") if isinstance(hp[k], bool) else str(hp[k]))
            for k in fields if k in hp and isinstance(hp[k], bool | int | float | str)}


def _same_value(logged: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(logged, bool):
        return logged is default
    if isinstance(default, int | float) and isinstance(logged, int | float):
        return float(logged) == float(default)
    return str(logged) == str(default)


def _env_value(v: Any) -> str:
    return ("1" if v else "0") if isinstance(v, bool) else shlex.quote(str(v))


def config_overrides(runs: list[Run], defaults: dict[str, Any]) -> dict[str, str]:
    """Env overrides the runs used (Hyperparameters dump vs Config defaults), identical across seeds."""
    per_run = []
    for run in runs:
        hp = run.parsed["hyperparameters"]
        per_run.append({k.upper(): _env_value(hp[k]) for k in sorted(defaults)
                        if k in hp and k not in RUN_BOOKKEEPING and not _same_value(hp[k], defaults[k])})
    for run, ov in zip(runs[1:], per_run[1:]):
        if ov != per_run[0]:
            key = sorted(set(ov.items()) ^ set(per_run[0].items()))[0][0]
            raise RecordError(f"seeds {runs[0].seed} and {run.seed} ran different configs ({key})")
    return per_run[0]


def hardware(runs: list[Run]) -> tuple[str, bool]:
    """(description, is_8xh100) from the logs: nvidia-smi's GPU rows, else the CPU."""
    gpus = runs[0].parsed["gpus"]
    if any(r.parsed["gpus"] != gpus for r in runs):
        raise RecordError("the seeds ran on different hardware (nvidia-smi GPU lists differ)")
    devices = {r.parsed["runtime"].get("device") for r in runs}
    if gpus and devices <= {"cuda"}:
        names = sorted(set(gpus))
        return f"{len(gpus)}x{' + '.join(names)}", len(gpus) == 8 and all("H100" in g for g in gpus)
    cpus = runs[0].parsed["runtime"].get("cpus", "?")
    return f"CPU ({cpus} cores), not 8xH100", False
