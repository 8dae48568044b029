"""Records on our own runs: build (inline, pack, equivalence, sandboxed smoke run, folder), check (every rule
catches its violation) and submit (a local commit on a new branch, never a push). Upstream shapes and hostile
scripts are in tests/test_referee.py.

Two real tiny training runs (seeds 1 and 2) and one real build with the packed-file smoke run happen once per
session (fixtures `tiny_runs`, `record`); every check_record case mutates a copy of that folder."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN

import train_gpt
from tools import build_record, check_record, record_build, submit
from tools.log_parser import parse_log
from tools.record_build import BuildOptions
from tools.record_checks import Options, check_folder, train_tolerance
from tools.record_pack import RecordError, check_equivalent, inline_modules, pack, unpack
from tools.record_runs import Run, hardware
from tools.record_smoke import SmokeResult, smoke_dataset, smoke_run
from tools.safe_io import read_log
from tools.sandbox import sandbox_status
from tools.verdicts import Row

NO_SANDBOX = sandbox_status()
needs_sandbox = pytest.mark.skipif(NO_SANDBOX is not None, reason=f"no sandbox: {NO_SANDBOX}")
NORUN = Options(run=False)  # the sandboxed run is tested once (end to end), the other checks without it

SEEDS = (1, 2)
RECORD_NAME = "2026-01-02_TinyCpuRecord"


# --- shared fixtures: two tiny runs, one built record ---------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """OUT_DIRs of two finished tiny CPU runs from the repo (train_gpt.py + quant/), in-process, one thread."""
    root = tmp_path_factory.mktemp("record_runs")
    data, tok, vocab = smoke_dataset(root)
    assert tok.parent == data  # the sandbox binds only the smoke work dir: the tokenizer must be inside it
    rt = train_gpt.Runtime()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dirs = []
    try:
        for seed in SEEDS:
            out = root / f"seed{seed}"
            cfg = train_gpt.Config(**{**TINY_TRAIN, **dict(  # the suite's tiny config, smaller still
                vocab_size=vocab, num_layers=2, num_heads=2, num_kv_heads=1, mlp_mult=2.0, loop_start=0, loop_end=0,
                parallel_residual_start=1, xsa_last_n=2, iterations=3, train_log_every=1, train_batch_tokens=512,
                val_batch_tokens=4096, compressor="zstd")}, data_path=str(data), tokenizer_path=str(tok),
                out_dir=str(out), run_id=f"tiny{seed}", seed=seed)
            train_gpt.run(cfg, rt)
            dirs.append(out)
    finally:
        torch.set_num_threads(threads)
    return dirs


def build_args(runs: list[Path], out: Path, **kw: object) -> BuildOptions:
    base = dict(run=runs, log=[], artifact=[], name="Tiny CPU record", track="non_record_16mb", author="Test Author",
                github_id="tester", blurb="A tiny CPU run.", date="2026-01-02", out=out, upstream=False)
    return BuildOptions(**{**base, **kw})


@pytest.fixture(scope="session")
def record(tiny_runs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The record folder built from the two runs (includes the packed-file smoke run)."""
    return record_build.build(build_args(tiny_runs, tmp_path_factory.mktemp("records") / RECORD_NAME))


@pytest.fixture
def rec(record: Path, tmp_path: Path) -> Path:
    """A private copy of the record folder to mutate."""
    return Path(shutil.copytree(record, tmp_path / RECORD_NAME))


def check(folder: Path, **kw: object) -> list[Row]:
    return check_folder(folder, Options(**{"run": False, **kw}))


def statuses(rows: list[Row], check: str, seed: str = "") -> list[str]:
    return [r.status for r in rows if r.check == check and r.seed == seed]


# --- end to end ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_build_then_check_end_to_end(record: Path, tiny_runs: list[Path], capsys: pytest.CaptureFixture) -> None:
    names = sorted(p.name for p in record.iterdir())
    assert names == sorted(["README.md", "requirements.txt", "submission.json", "train_gpt.py", "train_gpt_readable.py",
                            "train_seed1.log", "train_seed2.log", "final_model_seed1.int6.ptz",
                            "final_model_seed2.int6.ptz"])
    packed = (record / "train_gpt.py").read_text()
    readable = (record / "train_gpt_readable.py").read_text()
    assert packed.count("\n") == 2 and packed.startswith("import lzma as L,base64 as B\nexec(")
    assert len(packed) < len(readable) / 2 and "from quant" not in readable and "__all__" not in readable
    parsed = {s: parse_log(read_log(d / "logs" / f"tiny{s}.txt")) for s, d in zip(SEEDS, tiny_runs)}
    for s, d in zip(SEEDS, tiny_runs):  # logs and artifacts are byte copies
        assert (record / f"train_seed{s}.log").read_bytes() == (d / "logs" / f"tiny{s}.txt").read_bytes()
        assert (record / f"final_model_seed{s}.int6.ptz").read_bytes() == (d / "final_model.int6.ptz").read_bytes()

    sub = json.loads((record / "submission.json").read_text())
    assert sub["seeds"] == [1, 2] and sub["track"] == "non_record_16mb" and sub["author"] == "Test Author"
    assert sub["bytes_code"] == len(packed.encode())
    arts = [(record / f"final_model_seed{s}.int6.ptz").stat().st_size for s in SEEDS]
    assert sub["bytes_total"] == sub["bytes_code"] + max(arts) and sub["artifact_bytes_max"] == max(arts)
    finals = [parsed[s]["final_val_bpb"] for s in SEEDS]
    assert sub["val_bpb"] == pytest.approx(sum(finals) / 2, abs=1e-8)
    assert sub["seed_results"]["2"]["val_bpb"] == finals[1] and sub["seed_results"]["1"]["artifact_bytes"] == arts[0]
    assert sub["seed_results"]["1"]["train_time_s"] == parsed[1]["time_totals"]["train"]
    assert sub["hardware"].startswith("CPU (") and sub["pytorch_version"] == torch.__version__
    assert sub["compliance"]["score_first_ttt"] is True and sub["compliance"]["three_seeds"] is False
    assert sub["compliance"]["artifact_under_16mb"] and sub["compliance"]["no_pre_quant_ttt"]

    readme = (record / "README.md").read_text()
    assert readme.startswith("# Non-record: Tiny CPU record\n\n**val_bpb = ")
    assert "| **Mean** |" in readme and "| **Std** |" in readme and "Score before update" in readme
    assert "SEED=1 torchrun --standalone --nproc_per_node=1 train_gpt.py" in readme
    assert "MODEL_DIM=64" in readme and "COMPRESSOR=zstd" in readme  # the tiny runs overrode the defaults
    assert re.search(r"^COMPRESSOR=zstd DATA_PATH=\S+ .*MODEL_DIM=64 .*SEED=1 torchrun --standalone", readme, re.M)

    assert check_record.main([str(record)]) == 0  # with the sandboxed run where there is a sandbox
    out = capsys.readouterr().out
    assert "code vs log" in out and "sandbox run" in out
    if NO_SANDBOX is None:
        assert "PASS: 0 violation(s), 0 warning(s)" in out and re.search(r"sandbox verdict .* PASS", out)
    else:
        assert "WARN: 0 violation(s), 1 warning(s)" in out and f"not run: {NO_SANDBOX}" in out


def test_rebuild_is_byte_identical(record: Path) -> None:
    # the logs carry the sources: inlining + packing them again gives the same bytes (determinism)
    sources = parse_log(read_log(record / "train_seed1.log"))["sources"]
    assert set(sources) == {"train_gpt.py", "data/__init__.py", "data/shards.py", "evals/__init__.py",
                            "evals/phased_ttt.py", "quant/__init__.py", "quant/codec.py", "quant/gptq.py",
                            "quant/lowbit.py", "quant/lqer.py", "quant/pack.py", "quant/rans.py", "quant/sdclip.py"}
    readable = inline_modules(sources)
    assert readable == (record / "train_gpt_readable.py").read_text()
    assert "# ---- data/shards.py" in readable and "class DocumentPackingLoader:" in readable
    assert "# ---- evals/phased_ttt.py" in readable and "def eval_phased_ttt(" in readable
    assert not re.search(r"^\s*(from (data|quant)[. ]|import (data|quant)\b)", readable, re.M)
    assert pack(readable) == pack(readable) == (record / "train_gpt.py").read_text()


def test_packed_is_equivalent_and_a_difference_is_caught(record: Path) -> None:
    readable = (record / "train_gpt_readable.py").read_text()
    packed = (record / "train_gpt.py").read_text()
    check_equivalent(readable, packed)
    inner = unpack(packed)
    assert '"""' not in inner and "def main():" in inner  # no docstrings, no signature annotations
    assert "data_dir: str = './data/'" in inner  # Config's field annotations survive (a dataclass reads them)
    tampered = pack(readable.replace("ARTIFACT_LIMIT_BYTES = 16_000_000", "ARTIFACT_LIMIT_BYTES = 17_000_000"))
    with pytest.raises(RecordError, match="not equivalent"):
        check_equivalent(readable, tampered)


@needs_sandbox
def test_smoke_run_failure_is_reported(record: Path, tmp_path: Path) -> None:
    readable = (record / "train_gpt_readable.py").read_text()
    fields = set(record_build.config_defaults(readable))
    broken = readable.replace("from __future__ import annotations\n",
                              "from __future__ import annotations\nraise SystemExit('boom at start')\n", 1)
    with pytest.raises(RecordError, match=r"(?s)smoke run .* failed \(exit 1\).*boom at start"):
        smoke_run(pack(broken), tmp_path / "a", fields)
    # a packed file that reaches for the network is refused by what the sandbox saw, not by its text
    hostile = readable.replace("from __future__ import annotations\n", "from __future__ import annotations\nimport "
                               "socket\nsocket.socket().connect_ex(('192.0.2.1', 80))\n", 1)
    with pytest.raises(RecordError, match="did what records may not: socket.connect"):
        smoke_run(pack(hostile), tmp_path / "b", fields)


# --- build_record: inline/pack units on synthetic sources ----------------------------------------------------------

TRAIN = '''"""Doc of train."""

from __future__ import annotations

import os
from dataclasses import dataclass

# >>> inline local modules (replaced)
from data.shards import shard_bytes
from quant import Codec, scale

# <<< inline local modules


@dataclass(frozen=True)
class Config:
    bits: int = 6  # a field: its annotation must survive packing


def main() -> int:
    """Entry."""
    return scale(Config().bits) + Codec().size() + len(os.sep)


def header() -> int:
    return shard_bytes(0)
'''
QUANT = {
    "quant/__init__.py": ('"""Pkg."""\nfrom quant.a import scale\nfrom quant.b import Codec\n\n'
                          '__all__ = ["Codec", "scale"]\n'),
    "quant/b.py": ('"""Module b: uses a."""\n\nfrom __future__ import annotations\n\nimport math\nfrom dataclasses import '
                   'dataclass, field\n\nfrom quant.a import scale\n\n__all__ = ["Codec"]\n\n\n@dataclass\nclass Codec:\n'
                   '    n: int = 2\n    extra: list = field(default_factory=list)\n\n    def size(self) -> int:\n'
                   '        return scale(self.n) + math.floor(1.5)\n'),
    "quant/a.py": ('"""Module a."""\n\nfrom __future__ import annotations\n\nimport os\n\n__all__ = ["scale"]\n\n\n'
                   'def scale(x: int) -> int:\n    """Twice."""\n    return 2 * x\n'),
}
DATA = {  # the data package: an __init__ with only a docstring, and a module that uses quant/a.py
    "data/__init__.py": '"""Data pkg."""\n',
    "data/shards.py": ('"""Shards."""\n\nfrom __future__ import annotations\n\nimport os\n\nfrom quant.a import scale\n\n'
                       'HEADER_INTS = 256\n\n\ndef shard_bytes(n: int) -> int:\n    return scale(2 * HEADER_INTS + n)\n'),
}
LEGACY_TRAIN = TRAIN.replace("inline local modules", "inline quant").replace("from data.shards import shard_bytes\n", "")
LEGACY_TRAIN = LEGACY_TRAIN[:LEGACY_TRAIN.index("\n\ndef header()")] + "\n"


def load_module(src: str, name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    sys.modules[name] = mod  # dataclasses look their module up
    try:
        exec(compile(src, name, "exec"), mod.__dict__)
    finally:
        del sys.modules[name]
    return mod


def test_inline_orders_hoists_and_drops() -> None:
    readable = inline_modules({"train_gpt.py": TRAIN, **QUANT, **DATA})
    # dependency order, ties by name: quant/a.py before both of its users
    at = [readable.index(f"# ---- {name}") for name in ("quant/a.py", "data/shards.py", "quant/b.py")]
    assert at == sorted(at)
    assert "# >>> inline local modules: quant/a.py, data/shards.py, quant/b.py (inlined by" in readable
    assert "from quant" not in readable and "from data." not in readable and "__all__" not in readable
    assert readable.count("from __future__") == 1 and "Data pkg." not in readable  # an __init__ inlines as nothing
    assert readable.startswith('"""Doc of train."""\n\nfrom __future__ import annotations\n\nimport math\nimport os\n'
                               'from dataclasses import dataclass, field\n\n# >>> inline local modules')
    assert "# Module b: uses a." in readable and "# Shards." in readable  # module docstrings become comments
    mod = load_module(readable, "readable_probe")
    assert mod.main() == 12 + 5 + 1 and mod.header() == 1024


def test_inline_reads_logs_with_the_legacy_quant_markers() -> None:
    # runs logged before data/shards.py was a module mark the block `# >>> inline quant`: still inlined, same text
    readable = inline_modules({"train_gpt.py": LEGACY_TRAIN, **QUANT})
    assert "# >>> inline quant: quant/a.py, quant/b.py (inlined by tools/build_record.py)" in readable
    assert "# <<< inline quant\n" in readable and "inline local modules" not in readable
    assert load_module(readable, "legacy_probe").main() == 18


def test_inline_the_repo_sources_without_a_run(tmp_path: Path) -> None:
    # what a repo run logs (code_sources) inlines into one file that needs neither data/ nor quant/
    sources = {k: v.decode() for k, v in train_gpt.code_sources().items()}
    assert {"data/__init__.py", "data/shards.py", "quant/__init__.py", "quant/codec.py"} <= set(sources)
    assert sources["data/shards.py"] == (Path(train_gpt.__file__).parent / "data/shards.py").read_text()
    readable = inline_modules(sources)
    check_equivalent(readable, pack(readable))
    script = tmp_path / "train_gpt.py"
    script.write_text(readable)
    mod = types.ModuleType("repo_probe")
    mod.__file__ = str(script)
    sys.modules["repo_probe"] = mod  # dataclasses look their module up
    try:
        exec(compile(readable, str(script), "exec"), mod.__dict__)
    finally:
        del sys.modules["repo_probe"]
    assert mod.load_data.__module__ == "repo_probe" and mod.DocumentPackingLoader.__module__ == "repo_probe"
    assert mod.code_sources() == {"train_gpt.py": script.read_bytes()}  # nothing imported as a module: one file


def test_pack_keeps_dataclass_fields_drops_signatures() -> None:
    readable = inline_modules({"train_gpt.py": TRAIN, **QUANT, **DATA})
    packed = pack(readable)
    check_equivalent(readable, packed)
    mod = load_module(unpack(packed), "packed_probe")
    assert mod.main() == 18 and mod.main.__annotations__ == {} and mod.main.__doc__ is None
    assert mod.Config.__dataclass_fields__["bits"].type == "int"
    # a source that reads annotations keeps the signature ones
    reader = TRAIN + "\n\ndef hints() -> dict:\n    import typing\n    return typing.get_type_hints(main)\n"
    mod = load_module(unpack(pack(inline_modules({"train_gpt.py": reader, **QUANT, **DATA}))), "reader_probe")
    assert mod.main.__annotations__ == {"return": "int"} and mod.main() == 18


def _edit(name: str, old: str, new: str):
    def change(s: dict[str, str]) -> dict[str, str]:
        assert old in s[name], (name, old)
        return {**s, name: s[name].replace(old, new)}
    return change


@pytest.mark.parametrize("change, match", [
    (lambda s: {**s, "quant/a.py": s["quant/a.py"] + "\n\ndef main():\n    return 0\n"}, "name clash: .*`main`"),
    (_edit("train_gpt.py", "Codec, scale", "Codec, scale as sc"), "aliases"),
    (_edit("quant/a.py", "import os", "import numpy as os"), "import clash"),
    (_edit("quant/a.py", "import os", "from quant.b import Codec"), "cycle"),
    (_edit("train_gpt.py", "# <<< inline local modules\n", ""), "exactly one"),
    (lambda s: {k: v for k, v in s.items() if k != "quant/b.py"}, "no inlined quant module defines it"),
    (_edit("quant/b.py", "import scale", "import scale, nope"), "imports `nope` from quant/a.py, which does not define it"),
    # the data package is inlined under the same rules
    (lambda s: {**s, "data/shards.py": s["data/shards.py"] + "\n\ndef scale(x):\n    return x\n"},
     r"name clash: data/shards.py and quant/a.py both define `scale`"),
    (_edit("data/shards.py", "import os", "import numpy as os"), "import clash: data/shards.py binds os"),
    (_edit("data/shards.py", "def shard_bytes", "def shard_size"), "no inlined data.shards module defines it"),
    (lambda s: {k: v for k, v in s.items() if k != "data/shards.py"}, "`shard_bytes` from data.shards"),
    (_edit("data/shards.py", "import os", "import train_gpt"), "`import train_gpt` cannot be inlined"),
    (_edit("data/shards.py", "    return scale(", "    from quant.b import Codec\n    return scale("), "not at top level"),
    (_edit("data/__init__.py", '"""Data pkg."""\n', '"""Data pkg."""\nX = 1\n'), "data/__init__.py line 2: only re-exports"),
    (_edit("train_gpt.py", "\ndef header() -> int:", "\nfrom data.shards import HEADER_INTS\n\n\ndef header() -> int:"),
     "`from data.shards import HEADER_INTS` imports a local module outside the inline block"),
    (_edit("train_gpt.py", "from quant import Codec, scale\n", "from quant import Codec, scale\nimport data\n"),
     "only `from <package>"),
    (_edit("train_gpt.py", "import os\n", "import os\n# >>> inline quant\n"), "both .* markers"),
    (lambda s: {**s, "tools/x.py": "x = 1\n"},
     r"\['tools/x.py'\] are neither train_gpt.py nor modules of data/, evals/ or quant/"),
])
def test_inline_errors_are_one_line(change, match: str) -> None:
    with pytest.raises(RecordError, match=match) as e:
        inline_modules(change({"train_gpt.py": TRAIN, **QUANT, **DATA}))
    assert "\n" not in str(e.value)


# --- build_record: refusals on real runs ----------------------------------------------------------------------------

def run_build_cli(tiny_runs: list[Path], out: Path, *extra: str) -> int:
    args = [a for d in tiny_runs for a in ("--run", str(d))]
    return build_record.main([*args, "--name", "Tiny CPU record", "--out", str(out), *extra])


def test_cpu_runs_cannot_be_a_10min_record(tiny_runs: list[Path], tmp_path: Path, capsys) -> None:
    assert run_build_cli(tiny_runs, tmp_path / "r", "--track", "10min_16mb") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs 8xH100" in err and "non_record_16mb" in err
    assert not (tmp_path / "r").exists()


def test_seeds_must_have_run_the_same_code(tiny_runs: list[Path], tmp_path: Path, capsys) -> None:
    other = Path(shutil.copytree(tiny_runs[1], tmp_path / "seed2"))
    log = other / "logs" / "tiny2.txt"
    text = log.read_bytes()
    i = text.index(b"source_file: quant/gptq.py")
    i = text.index(b"import", i)
    log.write_bytes(text[:i] + b"IMPORT" + text[i + 6:])  # same length: the frame stays valid
    assert run_build_cli([tiny_runs[0], other], tmp_path / "r", "--track", "non_record_16mb") == 1
    assert "ran different code: quant/gptq.py differs" in capsys.readouterr().err
    assert run_build_cli([tiny_runs[0], tiny_runs[0]], tmp_path / "r", "--track", "non_record_16mb") == 1
    assert "duplicate seeds" in capsys.readouterr().err


def test_existing_output_is_never_overwritten(tiny_runs: list[Path], tmp_path: Path, capsys) -> None:
    (tmp_path / "r").mkdir()
    assert run_build_cli(tiny_runs, tmp_path / "r", "--track", "non_record_16mb") == 1
    assert "already exists" in capsys.readouterr().err


def test_artifact_must_belong_to_the_log(tiny_runs: list[Path], tmp_path: Path, capsys) -> None:
    log = next((tiny_runs[0] / "logs").glob("*.txt"))
    other = tmp_path / "other.ptz"
    other.write_bytes((tiny_runs[0] / "final_model.int6.ptz").read_bytes() + b"x")
    assert build_record.main(["--log", str(log), "--artifact", str(other),
                              "--name", "x", "--track", "non_record_16mb", "--author", "A", "--github-id", "a",
                              "--out", str(tmp_path / "r")]) == 1
    assert "not this run's artifact" in capsys.readouterr().err


def test_upstream_layout(tiny_runs: list[Path], record: Path, tmp_path: Path, monkeypatch) -> None:
    # --upstream drops the readable twin and artifacts; check_record then falls back to the logged model bytes
    from tools.sandbox import Observation
    monkeypatch.setattr(record_build, "smoke_run",
                        lambda packed, work, fields: SmokeResult(0.0, len(packed), 1, 1.0, Observation(ran=True)))
    out = record_build.build(build_args(tiny_runs, tmp_path / "up", upstream=True))
    assert sorted(p.name for p in out.iterdir()) == sorted(["README.md", "requirements.txt", "submission.json",
                                                            "train_gpt.py", "train_seed1.log", "train_seed2.log"])
    assert (out / "train_gpt.py").read_bytes() == (record / "train_gpt.py").read_bytes()
    assert ".ptz" not in (out / "README.md").read_text()
    rows = check(out)
    size = [r for r in rows if r.check == "size"]
    assert len(size) == 2 and all(r.status == "PASS" and "logged model bytes" in r.value for r in size)
    assert not [r for r in rows if r.status == "FAIL"]


def test_build_without_a_sandbox_never_runs_the_code(tiny_runs: list[Path], tmp_path: Path, monkeypatch) -> None:
    from tools import sandbox

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the smoke run must not start without a sandbox")
    monkeypatch.setattr(sandbox, "sandbox_status", lambda: "bubblewrap is not installed")
    monkeypatch.setattr(record_build, "smoke_run", boom)
    said: list[str] = []
    out = record_build.build(build_args(tiny_runs, tmp_path / "nosbx"), say=said.append)
    assert (out / "train_gpt.py").is_file()
    assert any("smoke run skipped, the packed file was not executed: bubblewrap" in s for s in said)


# --- check_record: each rule catches its violation -------------------------------------------------------------------

def test_size_cap_is_exact(rec: Path) -> None:
    code = (rec / "train_gpt.py").stat().st_size
    art = rec / "final_model_seed1.int6.ptz"
    with open(art, "r+b") as f:  # sparse: no 16 MB written
        f.truncate(16_000_000 - code)
    rows = check(rec)
    assert statuses(rows, "size", "1") == ["PASS"] and statuses(rows, "artifact size", "1") == ["FAIL"]
    with open(art, "r+b") as f:
        f.truncate(16_000_001 - code)
    rows = check(rec)
    assert statuses(rows, "size", "1") == ["FAIL"] and statuses(rows, "size", "2") == ["PASS"]


def set_ledger(log: Path, budget: str, phase: str, target: float) -> None:
    """Rewrite one ledger row so that the budget's total is `target`, and the total line with it."""
    text = log.read_text()
    rows = re.findall(r"^time_ledger phase:(\S+) seconds:([\d.]+) budget:(\S+)$", text, re.M)
    others = sum(float(s) for p, s, b in rows if b == budget and p != phase)
    text = re.sub(rf"^time_ledger phase:{phase} seconds:[\d.]+ budget:{budget}$",
                  f"time_ledger phase:{phase} seconds:{target - others:.3f} budget:{budget}", text, flags=re.M)
    text = re.sub(rf"^(time_ledger_total .*){budget}:[\d.]+", rf"\g<1>{budget}:{target:.3f}", text, flags=re.M)
    log.write_text(text)


def test_train_time_over_budget(rec: Path) -> None:
    # non-record track: no 600 s rule, the times are information
    log = rec / "train_seed2.log"
    set_ledger(log, "train", "train_loop", 700.0)
    assert statuses(check(rec), "train time", "2") == ["INFO"]
    sub = json.loads((rec / "submission.json").read_text())
    (rec / "submission.json").write_text(json.dumps({**sub, "track": "10min_16mb"}))
    set_ledger(log, "train", "train_loop", 600.0)
    rows = check(rec)
    assert statuses(rows, "train time", "2") == ["PASS"]  # the limit itself is allowed
    assert statuses(rows, "hardware", "2") == ["FAIL"]  # a CPU run is no 8xH100 record
    tol = train_tolerance(parse_log(read_log(log)))  # from the step lines, which the ledger edit leaves alone
    # the helper sets the budget's total (loop + Hessians); the rule is on the loop alone
    hess = sum(float(s) for ph, s, b in re.findall(r"^time_ledger phase:(\S+) seconds:([\d.]+) budget:(\S+)$",
                                                   log.read_text(), re.M) if b == "train" and ph != "train_loop")
    set_ledger(log, "train", "train_loop", 600.0 + 0.9 * tol + hess)  # within the loop's step granularity
    assert statuses(check(rec), "train time", "2") == ["PASS"]
    set_ledger(log, "train", "train_loop", 600.0 + tol + 0.1 + hess)
    rows = check(rec)
    assert statuses(rows, "train time", "2") == ["FAIL"] and statuses(rows, "train time", "1") == ["PASS"]
    assert check_record.main([str(rec), "--no-run"]) == 1


def test_eval_time_over_budget_and_tampered_ledger(rec: Path) -> None:
    sub = json.loads((rec / "submission.json").read_text())
    (rec / "submission.json").write_text(json.dumps({**sub, "track": "10min_16mb"}))
    log = rec / "train_seed1.log"
    set_ledger(log, "eval", "quantized_ttt_phased", 600.5)
    assert statuses(check(rec), "eval time", "1") == ["FAIL"]
    # moving the TTT phase to budget:none does not take it out of the eval budget: its name decides
    text = log.read_text()
    text = re.sub(r"^time_ledger phase:quantized_ttt_phased (seconds:\S+) budget:eval$",
                  r"time_ledger phase:quantized_ttt_phased \1 budget:none", text, flags=re.M)
    log.write_text(re.sub(r"eval:[\d.]+ limit", "eval:1.000 limit", text))
    rows = check(rec)
    assert statuses(rows, "eval time", "1") == ["FAIL"]
    ledger = [r.value for r in rows if r.check == "time ledger" and r.seed == "1"]
    assert any("quantized_ttt_phased is labelled budget:none" in v for v in ledger)


def test_missing_seed_log(rec: Path) -> None:
    (rec / "train_seed2.log").unlink()
    rows = check(rec)
    assert statuses(rows, "seed log", "2") == ["WARN"]  # metadata; the score rules judge what the logs support
    assert statuses(rows, "artifact", "2") == []  # no log for it: its artifact is not judged
    sub = json.loads((rec / "submission.json").read_text())
    sub["seeds"].append(3)  # and a log that submission.json does not list
    (rec / "submission.json").write_text(json.dumps(sub))
    shutil.copyfile(rec / "train_seed1.log", rec / "train_seed4.log")
    rows = check(rec)
    assert statuses(rows, "seed log", "3") == ["WARN"] and statuses(rows, "seed log", "4") == ["WARN"]
    assert any("train_seed4.log: the file name says seed 4, the log says 1" in r.value for r in rows)


def test_submission_json_disagreeing_with_a_log(rec: Path) -> None:
    sub = json.loads((rec / "submission.json").read_text())
    good = json.loads(json.dumps(sub))
    sub["seed_results"]["1"]["val_bpb"] += 1e-4  # worse than the log: a metadata defect
    (rec / "submission.json").write_text(json.dumps(sub))
    rows = check(rec)
    assert statuses(rows, "json val_bpb", "1") == ["WARN"] and statuses(rows, "json val_bpb", "2") == ["PASS"]
    assert statuses(rows, "json val_bpb (mean)") == ["PASS"]
    sub["seed_results"]["1"]["val_bpb"] -= 3e-4  # better than the log supports
    (rec / "submission.json").write_text(json.dumps(sub))
    assert statuses(check(rec), "json val_bpb", "1") == ["FAIL"]
    sub = json.loads(json.dumps(good))
    sub["val_bpb"] = float(f"{sub['val_bpb']:.1f}") if float(f"{sub['val_bpb']:.1f}") < sub["val_bpb"] - 1e-4 else (
        sub["val_bpb"] - 0.03)  # a coarse rounding that flatters the score
    sub["bytes_code"] += 1
    (rec / "submission.json").write_text(json.dumps(sub))
    rows = check(rec)
    assert statuses(rows, "json val_bpb (mean)") == ["FAIL"] and statuses(rows, "json bytes_code") == ["WARN"]


def test_artifact_replaced_by_random_bytes(rec: Path) -> None:
    art = rec / "final_model_seed1.int6.ptz"
    art.write_bytes(bytes(random.Random(0).getrandbits(8) for _ in range(art.stat().st_size)))
    rows = check(rec)
    assert statuses(rows, "artifact size", "1") == ["PASS"]  # same size...
    assert statuses(rows, "artifact parses", "1") == ["FAIL"]  # ...but not an artifact
    assert statuses(rows, "artifact parses", "2") == ["PASS"]
    log = rec / "train_seed1.log"  # with the hash logged (the trainer's `artifact:` line), the hash decides too
    text = log.read_text()
    i = text.rindex("\nbytes_total:") + 1
    log.write_text(text[:i] + f"artifact: final_model.int6.ptz sha256:{'0' * 64}\n" + text[i:])
    assert statuses(check(rec), "artifact sha256", "1") == ["FAIL"]


def test_symlinks_and_fifos_are_not_followed(rec: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    (rec / "notes.log").symlink_to(secret)
    os.mkfifo(rec / "train_seed9.log")
    rows = check(rec)
    inputs = [r.value for r in rows if r.check == "input"]
    assert any("notes.log: a symlink" in v for v in inputs) and any("train_seed9.log: a FIFO" in v for v in inputs)
    assert not [r for r in rows if r.status == "FAIL"]


def test_unreadable_input_exits_2(rec: Path, tmp_path: Path, capsys) -> None:
    assert check_record.main([str(tmp_path / "nope")]) == 2
    (rec / "submission.json").write_text("{not json")
    assert check_record.main([str(rec), "--no-run"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 2


def test_significance_against_a_reference(record: Path, tmp_path: Path) -> None:
    # a reference whose seeds are clearly worse (by far more than 0.005 nats) vs one that is the same
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "train_gpt.py").write_text("print('reference')\n")
    sub = json.loads((record / "submission.json").read_text())
    worse = {s: {"val_bpb": r["val_bpb"] + 5.0 + 0.001 * i} for i, (s, r) in enumerate(sub["seed_results"].items())}
    (ref / "submission.json").write_text(json.dumps({"seed_results": worse}))
    rows = check(record, against=ref)
    sig = next(r for r in rows if r.check == "significance")
    assert sig.status == "PASS" and "0.005 nats at" in sig.value
    assert statuses(rows, "seeds needed") == ["INFO"]
    same = {s: {"val_bpb": r["val_bpb"] + 0.0001 * (i - 0.5)} for i, (s, r) in enumerate(sub["seed_results"].items())}
    (ref / "submission.json").write_text(json.dumps({"seed_results": same}))
    assert statuses(check(record, against=ref, alpha=0.01), "significance") == ["FAIL"]


# --- submit ----------------------------------------------------------------------------------------------------------

def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def upstream(tmp_path: Path, monkeypatch) -> Path:
    """A fresh `git init` standing in for the openai/parameter-golf clone, with a bare `origin` to push to."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no global git identity: the placeholder is used
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.delenv(key, raising=False)
    repo = tmp_path / "parameter-golf"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "README.md").write_text("upstream\n")
    git(repo, "add", "README.md")
    git(repo, "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q", "-m", "init")
    subprocess.run(["git", "init", "-q", "--bare", str(tmp_path / "origin.git")], check=True)
    git(repo, "remote", "add", "origin", str(tmp_path / "origin.git"))
    return repo


def test_submit_commits_on_a_new_branch_without_pushing(rec: Path, upstream: Path, capsys) -> None:
    assert submit.main([str(rec), "--upstream-repo", str(upstream), "--no-run"]) == 0  # the sandbox is tested above
    out = capsys.readouterr().out
    assert "not pushed" in out and "PR title:\nNon-record: Tiny CPU record (val_bpb " in out
    assert "| 1 |" in out and "torchrun --standalone --nproc_per_node=8" in out
    assert git(upstream, "branch", "--show-current").strip() == f"record/{RECORD_NAME}"
    files = git(upstream, "show", "--name-only", "--format=", "HEAD").split()
    prefix = f"records/track_non_record_16mb/{RECORD_NAME}/"
    assert sorted(files) == sorted(prefix + f for f in ["README.md", "requirements.txt", "submission.json",
                                                        "train_gpt.py", "train_seed1.log", "train_seed2.log"])
    assert git(upstream, "log", "-1", "--format=%an <%ae>").strip() == "pgolf submit <pgolf-submit@localhost>"
    readme = (upstream / prefix / "README.md").read_text()
    assert ".ptz" not in readme and "train_gpt_readable.py" not in readme and "`train_seed2.log`" in readme
    assert (upstream / prefix / "train_gpt.py").read_bytes() == (rec / "train_gpt.py").read_bytes()
    assert git(upstream, "ls-remote", "origin") == ""  # nothing pushed
    assert git(upstream, "status", "--porcelain") == ""
    # again: the branch exists now, so it refuses
    assert submit.main([str(rec), "--upstream-repo", str(upstream), "--no-run"]) == 1


def test_submit_refuses_a_failing_record(rec: Path, upstream: Path, capsys) -> None:
    sub = json.loads((rec / "submission.json").read_text())
    (rec / "submission.json").write_text(json.dumps({**sub, "github_id": "unknown"}))  # build_record's default
    assert submit.main([str(rec), "--upstream-repo", str(upstream), "--branch", "try", "--no-run"]) == 1
    assert "no author/github_id" in capsys.readouterr().err
    (rec / "submission.json").write_text(json.dumps(sub))
    art = rec / "final_model_seed2.int6.ptz"
    art.write_bytes(art.read_bytes() + b"x")
    assert submit.main([str(rec), "--upstream-repo", str(upstream), "--branch", "try", "--no-run"]) == 1
    assert "fails tools/check_record.py" in capsys.readouterr().err
    assert git(upstream, "branch", "--list", "try") == "" and git(upstream, "branch", "--show-current").strip() == "main"


def test_hardware_from_logs() -> None:
    def run(gpus: list[str], device: str, **runtime: object) -> Run:
        return Run(Path("x.log"), Path("x.ptz"), {"gpus": gpus, "runtime": {"device": device, **runtime}})

    h100 = ["NVIDIA H100 80GB HBM3"] * 8
    assert hardware([run(h100, "cuda"), run(h100, "cuda")]) == ("8xNVIDIA H100 80GB HBM3", True)
    assert hardware([run(h100[:2], "cuda")]) == ("2xNVIDIA H100 80GB HBM3", False)
    assert hardware([run([], "cpu", cpus=16)]) == ("CPU (16 cores), not 8xH100", False)
    with pytest.raises(RecordError, match="different hardware"):
        hardware([run(h100, "cuda"), run(h100[:4], "cuda")])


def test_submit_include_readable(rec: Path, upstream: Path, capsys) -> None:
    assert submit.main([str(rec), "--upstream-repo", str(upstream), "--branch", "rec-readable",
                        "--include-readable", "--no-run"]) == 0
    files = git(upstream, "show", "--name-only", "--format=", "HEAD").split()
    assert f"records/track_non_record_16mb/{RECORD_NAME}/train_gpt_readable.py" in files and len(files) == 7
    assert "`train_gpt_readable.py`" in capsys.readouterr().out


def test_submit_never_copies_a_symlink(rec: Path, upstream: Path, tmp_path: Path, capsys) -> None:
    secret = tmp_path / "id_secret"
    secret.write_text("SECRET TOKEN\n")
    (rec / "train_seed3.log").symlink_to(secret)  # looks like a log, points outside the folder
    assert submit.main([str(rec), "--upstream-repo", str(upstream), "--branch", "sym", "--no-run"]) == 1
    assert "train_seed3.log (a symlink)" in capsys.readouterr().err
    assert git(upstream, "branch", "--list", "sym") == "" and "SECRET" not in git(upstream, "log", "--all", "-p")
