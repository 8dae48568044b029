"""Experiment entry scripts (experiments/<name>.py) as the tools see them (docs/records.md "Packing experiments"):
which entry a run ran (its log's source frames name it), the entry loaded from this checkout, and its classes
installed into train_gpt while a tool rebuilds the run's Config and model (tools/requantize.py,
tools/check_legality.py). A run of train_gpt.py itself has no entry: the tools then use train_gpt as it is.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from tools.log_parser import split_sources
from tools.record_pack import ENTRY_PACKAGE, RecordError, entry_script
from tools.safe_io import read_log

ROOT = Path(__file__).resolve().parent.parent


class EntryError(ValueError):
    """An entry that cannot be found or does not follow the convention; one line."""


def run_log(summary: Path) -> Path | None:
    """The log of the run a run_summary.json describes: the path it names, else logs/<run_id>.txt beside it, else
    the one logs/*.txt there; None when there is none."""
    try:
        data = json.loads(summary.read_text())
    except (OSError, ValueError):
        return None
    data = data if isinstance(data, dict) else {}
    logs = summary.parent / "logs"
    named = [Path(data["log"])] if isinstance(data.get("log"), str) else []
    named += [logs / f"{data['run_id']}.txt"] if isinstance(data.get("run_id"), str) else []
    found = [p for p in named if p.is_file()]
    if not found and len(beside := sorted(logs.glob("*.txt"))) == 1:
        found = beside
    return found[0] if found else None


def run_entry(summary: Path) -> tuple[str, str] | None:
    """(entry, its logged source) of the run a run_summary.json describes, from the source frames of its log; None for
    a train_gpt.py run, or when no log is found (the caller's Config check then names what is missing)."""
    log = run_log(summary)
    if log is None:
        return None
    try:
        sources, _, _ = split_sources(read_log(log))
        entry = entry_script(sources)
    except (OSError, RecordError) as e:
        raise EntryError(f"{log}: {e}") from None
    return (entry, sources[entry]) if entry else None


def load_entry(entry: str, root: Path | None = None) -> ModuleType:
    """The entry script from this checkout (root/experiments/<name>.py), imported as experiments.<name> (once); it
    must follow the entry-script convention: PATCHES with a "Config", and installed()."""
    path = ((root or ROOT) / entry).resolve()
    name = f"{ENTRY_PACKAGE}.{Path(entry).stem}"
    mod = sys.modules.get(name)
    if mod is None or Path(getattr(mod, "__file__", "") or "").resolve() != path:
        if not path.is_file():
            raise EntryError(f"{entry}: the run's entry script is not in this checkout ({path})")
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while the class is made
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
    patches = getattr(mod, "PATCHES", None)
    if not (isinstance(patches, dict) and isinstance(patches.get("Config"), type) and callable(getattr(mod, "installed",
                                                                                                        None))):
        raise EntryError(f"{entry}: no PATCHES[\"Config\"] and installed() (the entry-script convention, "
                         f"docs/records.md)")
    return mod


def drift(entry: str, logged: str, root: Path | None = None) -> str | None:
    """A note when this checkout's entry differs from the one the run logged (the tool uses this checkout's)."""
    path = (root or ROOT) / entry
    if path.is_file() and path.read_text() == logged:
        return None
    return f"note: {entry} in this checkout differs from the one the run logged; using this checkout's"


@contextlib.contextmanager
def entry_installed(entry: str | None, root: Path | None = None) -> Iterator[ModuleType | None]:
    """train_gpt with the entry's patches (Config, GPT, Run, ...) for the duration; nothing for entry None."""
    if entry is None:
        yield None
        return
    mod = load_entry(entry, root)
    with mod.installed():
        yield mod


def entry_of_config(cfg: object) -> ModuleType | None:
    """The loaded entry module whose PATCHES["Config"] is cfg's class, else None (a train_gpt.Config)."""
    mod = sys.modules.get(type(cfg).__module__)
    patches = getattr(mod, "PATCHES", None)
    if isinstance(patches, dict) and patches.get("Config") is type(cfg) and callable(getattr(mod, "installed", None)):
        return mod
    return None


@contextlib.contextmanager
def installed_for(cfg: object) -> Iterator[None]:
    """train_gpt with the patches of the entry cfg belongs to (its model classes follow its config); nothing for a
    train_gpt.Config."""
    mod = entry_of_config(cfg)
    with mod.installed() if mod is not None else contextlib.nullcontext():
        yield
