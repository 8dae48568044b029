"""Packing an experiment's entry script (experiments/<name>.py) into a record: the inline rules on hand-written
sources (fast), then one real tiny run of a demo entry written here, built into a record whose packed file passes
check_record, and the tools that rebuild the run's Config and model (requantize, check_legality) on that run."""

from __future__ import annotations

import json
import re
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY_TRAIN

import train_gpt
from tools import check_record, experiment_entry, legality, record_build, record_checks, requantize
from tools.log_parser import parse_log
from tools.record_build import BuildOptions
from tools.record_folder import load_folder
from tools.record_pack import RecordError, check_equivalent, inline_modules, pack, unpack
from tools.record_smoke import smoke_dataset
from tools.safe_io import read_log
from tools.sandbox import sandbox_status

NO_SANDBOX = sandbox_status()

# --- inline rules on hand-written sources -----------------------------------------------------------------------------

TRAIN = '''"""Doc of train."""

from __future__ import annotations

import os
from dataclasses import dataclass

# >>> inline local modules
from quant.a import scale

# <<< inline local modules


@dataclass(frozen=True)
class Config:
    bits: int = 6


def main() -> int:
    return scale(Config().bits) + len(os.sep)


if __name__ == "__main__":
    main()
'''
QUANT = {"quant/__init__.py": '"""Pkg."""\nfrom quant.a import scale\n',
         "quant/a.py": '"""Module a."""\n\nfrom __future__ import annotations\n\n\ndef scale(x: int) -> int:\n'
                       '    return 2 * x\n'}
ENTRY = '''"""Entry doc: a bigger Config.

Second paragraph."""

from __future__ import annotations

import math
from dataclasses import dataclass

import train_gpt


@dataclass(frozen=True)
class BigConfig(train_gpt.Config):
    bits: int = 7
    extra: int = 2


def big_main() -> int:
    saved = train_gpt.Config
    train_gpt.Config = BigConfig  # rebinding a trainer global must reach the trainer's own functions
    try:
        return train_gpt.main() * 100 + BigConfig().extra + math.floor(1.5)
    finally:
        train_gpt.Config = saved


if __name__ == "__main__":
    big_main()
'''
NAME = "experiments/big.py"


def sources(**edit: str) -> dict[str, str]:
    return {"train_gpt.py": TRAIN, **QUANT, NAME: ENTRY, **edit}


def load_module(src: str, name: str) -> types.ModuleType:
    mod = types.ModuleType(name)
    sys.modules[name] = mod  # dataclasses and sys.modules[__name__] look the module up
    try:
        exec(compile(src, name, "exec"), mod.__dict__)
    finally:
        del sys.modules[name]
    return mod


def test_entry_is_appended_after_the_inlined_trainer() -> None:
    readable = inline_modules(sources())
    assert readable.startswith('"""Doc of train."""\n\nfrom __future__ import annotations\n\nimport math\nimport os\n'
                               'import sys\nfrom dataclasses import dataclass\n\n# >>> inline local modules: quant/a.py')
    assert readable.index("# ---- quant/a.py") < readable.index("# <<< inline local modules") < readable.index(
        f"# ---- {NAME} (the entry script)\n# Entry doc: a bigger Config.\n#\n# Second paragraph.\n\n"
        "train_gpt = sys.modules[__name__]")
    assert readable.count("if __name__ ==") == 1 and readable.endswith('\n\nif __name__ == "__main__":\n    big_main()\n')
    assert "import train_gpt" not in readable and readable.count("from __future__") == 1
    mod = load_module(readable, "entry_probe")
    assert mod.train_gpt is mod and mod.main() == 13
    assert mod.big_main() == 1500 + 2 + 1 and mod.Config is not mod.BigConfig  # 15: main() saw BigConfig's bits
    packed = pack(readable)
    check_equivalent(readable, packed)
    assert load_module(unpack(packed), "entry_packed_probe").big_main() == 1503
    # no entry: the plain build is untouched (the trainer keeps its guard)
    plain = inline_modules({"train_gpt.py": TRAIN, **QUANT})
    assert plain.endswith('if __name__ == "__main__":\n    main()\n') and "sys.modules" not in plain


def _entry(old: str, new: str) -> dict[str, str]:
    assert old in ENTRY, old
    return sources(**{NAME: ENTRY.replace(old, new, 1)})


@pytest.mark.parametrize("srcs, match", [
    (sources(**{"experiments/other.py": ENTRY}), r"two entry scripts among the logged sources \(experiments/big.py, "
                                                 r"experiments/other.py\); a record packs one"),
    (sources(**{"experiments/__init__.py": '"""Pkg."""\n'}), "experiments/__init__.py is not an entry script"),
    (sources(**{"experiments/sub/x.py": "x = 1\n"}), "experiments/sub/x.py is not an entry script"),
    (_entry("import train_gpt\n", "from train_gpt import Config\n"), r"line 10: `from train_gpt import Config` cannot"),
    (_entry("import train_gpt\n", "import train_gpt as tg\n"), "`import train_gpt as tg` cannot be packed"),
    (_entry("import math\n", "import math\nimport quant\n"), "`import quant` cannot be packed"),
    (_entry("import math\n", "import math\nfrom experiments import other\n"), "`from experiments import other` cannot"),
    (_entry("import math\n", "import math\nfrom . import other\n"), "`from . import other` cannot be packed"),
    (_entry("    saved = train_gpt.Config\n", "    import train_gpt\n    saved = train_gpt.Config\n"),
     "line 20: `import train_gpt` cannot be packed"),
    (_entry("def big_main()", "def main()"), "name clash: experiments/big.py defines `main` at top level and so does "
                                             r"train_gpt.py \(with its inlined modules\)"),
    (_entry("def big_main()", "def scale()"), "name clash: experiments/big.py defines `scale`"),  # from quant/a.py
    (_entry("import math\n", "import math\nfrom math import floor as Config\n"),
     "name clash: experiments/big.py imports `Config`, which train_gpt.py"),
    (_entry("import math\n", "import math as os\n"), "import clash: experiments/big.py binds os to math"),
    (_entry('\n\nif __name__ == "__main__":\n    big_main()\n', "\n"),
     'experiments/big.py does not end with an `if __name__ == "__main__":` block'),
    (sources(**{"train_gpt.py": TRAIN.replace('\n\nif __name__ == "__main__":\n    main()\n', "\n")}),
     'train_gpt.py does not end with an `if __name__ == "__main__":` block'),
    (_entry("from __future__ import annotations\n", ""), "lacks `from __future__ import annotations`"),
])
def test_entry_errors_are_one_line(srcs: dict[str, str], match: str) -> None:
    with pytest.raises(RecordError, match=match) as e:
        inline_modules(srcs)
    assert "\n" not in str(e.value)


def test_smoke_settings_take_the_runs_values_of_the_added_fields() -> None:
    from tools.record_runs import Run
    run = Run(Path("log"), Path("art"), {"hyperparameters": {"demo_scale": 2.0, "demo_on": True, "shape": [1, 2]}})
    fields = {"demo_scale", "demo_on", "shape", "model_dim"}
    plain = BuildOptions(name="x", track="non_record_16mb")
    assert record_build._smoke_settings(plain, run, fields, []) == {}  # a train_gpt.py record: smoke_run as before
    got = record_build._smoke_settings(plain, run, fields, ["demo_scale", "demo_on", "shape"])
    assert got == dict(extra_env={"DEMO_SCALE": "2.0", "DEMO_ON": "1"}, expect_fields=("demo_scale", "demo_on", "shape"))
    sized = BuildOptions(name="x", track="non_record_16mb", smoke_env=["demo_scale=0.5", "MODEL_DIM=32"])
    assert record_build._smoke_settings(sized, run, fields, ["demo_scale"])["extra_env"] == {"DEMO_SCALE": "0.5",
                                                                                             "MODEL_DIM": "32"}
    for bad in ("NOPE=1", "DEMO_SCALE"):
        with pytest.raises(RecordError, match=f"--smoke-env '{bad}': use KEY=VALUE with KEY a Config field"):
            record_build._smoke_settings(BuildOptions(name="x", track="t", smoke_env=[bad]), run, fields, [])


# --- a real run of a demo entry, its record, and the tools on it ------------------------------------------------------

DEMO = '''"""Demo experiment for the packer's tests: the logits are multiplied by DEMO_SCALE (one new Config field), and the
run logs one more line. Run it like the trainer: torchrun --standalone --nproc_per_node=2 experiments/demo_entry.py"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

import train_gpt


@dataclass(frozen=True)
class DemoConfig(train_gpt.Config):
    demo_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.demo_scale > 0:
            raise ValueError(f"bad config: DEMO_SCALE={self.demo_scale} must be > 0")


class DemoGPT(train_gpt.GPT):
    def forward_logits(self, ids: torch.Tensor, lora: object = None) -> torch.Tensor:
        return super().forward_logits(ids, lora) * self.cfg.demo_scale


class DemoRun(train_gpt.Run):
    def log_header(self) -> None:
        super().log_header()
        self.log(f"demo_entry: scale:{self.cfg.demo_scale}")


def demo_code_sources() -> dict[str, bytes]:
    files = ORIGINAL_CODE_SOURCES()
    here = Path(__file__).resolve()
    if Path(train_gpt.__file__).resolve() != here:  # packed: train_gpt is this very file
        files[f"experiments/{here.name}"] = here.read_bytes()
    return files


ORIGINAL_CODE_SOURCES = train_gpt.code_sources
PATCHES = dict(Config=DemoConfig, GPT=DemoGPT, Run=DemoRun, code_sources=demo_code_sources)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    saved = {k: getattr(train_gpt, k) for k in PATCHES}
    for k, v in PATCHES.items():
        setattr(train_gpt, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(train_gpt, k, v)


def experiment_main() -> None:
    with installed():
        train_gpt.main()


if __name__ == "__main__":
    experiment_main()
'''
DEMO_NAME = "experiments/demo_entry.py"
ORIGINAL_CONFIG = train_gpt.Config


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """OUT_DIR of one tiny in-process run of the demo entry (DEMO_SCALE=2.0), the entry under <root>/experiments."""
    root = tmp_path_factory.mktemp("demo_entry")
    (root / "experiments").mkdir()
    (root / DEMO_NAME).write_text(DEMO)
    data, tok, vocab = smoke_dataset(root)
    out = root / "run"
    mod = experiment_entry.load_entry(DEMO_NAME, root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with mod.installed():
            cfg = train_gpt.Config(**{**TINY_TRAIN, **dict(
                vocab_size=vocab, num_layers=2, num_heads=2, num_kv_heads=1, mlp_mult=2.0, loop_start=0, loop_end=0,
                parallel_residual_start=1, xsa_last_n=2, iterations=3, train_log_every=1, train_batch_tokens=512,
                val_batch_tokens=4096, compressor="zstd", ttt_enabled=False)}, data_path=str(data),
                tokenizer_path=str(tok), out_dir=str(out), run_id="demo", seed=3, demo_scale=2.0)
            train_gpt.run(cfg, train_gpt.Runtime())
        assert train_gpt.Config is ORIGINAL_CONFIG  # installed() restored the trainer
        yield out
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop("experiments.demo_entry", None)


@pytest.mark.slow
def test_entry_run_builds_a_record_that_checks(demo_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    parsed = parse_log(read_log(demo_run / "logs" / "demo.txt"))
    assert parsed["sources"][DEMO_NAME] == DEMO and parsed["hyperparameters"]["demo_scale"] == 2.0
    assert "demo_entry: scale:2.0" in read_log(demo_run / "logs" / "demo.txt")

    smokes: list[dict] = []
    real = record_build.smoke_run

    def spy(packed: str, work: Path, fields: set[str], **kw: object):  # keep what the sandboxed smoke run logged
        result = real(packed, work, fields, **kw)
        smokes.append(dict(kw, log=read_log(result.observation.workdir / "record/out/logs/smoke.txt")))
        return result
    monkeypatch.setattr(record_build, "smoke_run", spy)
    said: list[str] = []
    out = record_build.build(BuildOptions(
        name="Demo entry", track="non_record_16mb", run=[demo_run], author="Test Author", github_id="tester",
        date="2026-01-03", out=tmp_path / "2026-01-03_DemoEntry"), say=said.append)
    assert f"entry: {DEMO_NAME} (appended to train_gpt.py and its inlined modules; the packed file runs it)" in said
    readable = (out / "train_gpt_readable.py").read_text()
    assert f"# ---- {DEMO_NAME} (the entry script)" in readable and "import train_gpt" not in readable
    sub = json.loads((out / "submission.json").read_text())
    assert sub["entry"] == DEMO_NAME and sub["bytes_code"] == (out / "train_gpt.py").stat().st_size
    readme = (out / "README.md").read_text()
    assert f"Entry: `{DEMO_NAME}`" in readme and f"--nproc_per_node=1 {DEMO_NAME}`" in readme
    assert re.search(r"^COMPRESSOR=zstd .*DEMO_SCALE=2\.0 .*SEED=3 torchrun", readme, re.M)  # the experiment's override
    if NO_SANDBOX is None:  # the packed file ran the experiment: its field at the run's value, its own log line
        assert len(smokes) == 1 and smokes[0]["extra_env"] == {"DEMO_SCALE": "2.0"}
        assert smokes[0]["expect_fields"] == ("demo_scale",)
        assert "  demo_scale: 2.0\n" in smokes[0]["log"] and "demo_entry: scale:2.0" in smokes[0]["log"]
        assert "source_file: train_gpt.py bytes:" in smokes[0]["log"] and "experiments/" not in smokes[0]["log"][:200]

    assert check_record.main([str(out)]) == 0
    text = capsys.readouterr().out
    assert re.search(r"code vs log +3 +the logged sources are this script .* PASS", text)
    assert re.search(r"readable twin .* PASS", text) and "FAIL" not in text.replace("FAIL: 0", "")
    if NO_SANDBOX is None:
        assert re.search(r"sandbox verdict .* PASS", text)
    # no warning besides a missing sandbox (the packed entry's `sys.modules[__name__]` is not a dynamic import)
    warns = [line for line in text.splitlines() if line.rstrip().endswith("WARN")]
    assert all("sandbox run" in line for line in warns), warns

    # check_record's sandboxed run gets the experiment's field at its logged value, as the build's smoke run did
    packed = (out / "train_gpt.py").read_text()
    assert record_checks.experiment_env(load_folder(out), unpack(packed)) == {"DEMO_SCALE": "2.0"}
    assert record_checks.experiment_env(load_folder(out), readable.replace("(train_gpt.Config)", "(object)")) == {}

    # the record rebuilds byte-identically from its log
    sources = parse_log(read_log(out / "train_seed3.log"))["sources"]
    assert inline_modules(sources) == readable and pack(readable) == packed


@pytest.mark.slow
def test_tools_rebuild_the_experiments_config_and_model(demo_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(experiment_entry, "ROOT", demo_run.parent)  # the checkout that holds experiments/demo_entry.py
    summary = demo_run / "run_summary.json"
    assert experiment_entry.run_entry(summary) == (DEMO_NAME, DEMO)
    assert experiment_entry.drift(DEMO_NAME, DEMO) is None and "differs" in experiment_entry.drift(DEMO_NAME, "x = 1\n")

    # check_legality: the experiment's Config class, and its model class while loading
    cfg, source = legality.load_config(None, demo_run / "final_model.int6.ptz")
    assert type(cfg).__name__ == "DemoConfig" and cfg.demo_scale == 2.0 and f"entry {DEMO_NAME}" in source
    model = legality.load_model_fn(demo_run / "final_model.int6.ptz", cfg)()
    assert type(model).__name__ == "DemoGPT" and train_gpt.Config is ORIGINAL_CONFIG  # restored after loading

    # requantize: the float checkpoint scored with the experiment's model matches the run's own pre-quant score
    logged = json.loads(summary.read_text())["evals"]["pre-quantization post-ema"]["val_bpb"]
    art = tmp_path / "requant.ptz"
    assert requantize.main(["--checkpoint", str(demo_run / "final_model.pt"), "--method", "rtn", "--out", str(art)]) == 0
    out = capsys.readouterr().out
    assert f"float (unquantized) val_bpb {logged:.8f}" in out, out
    assert art.is_file() and train_gpt.Config is ORIGINAL_CONFIG

    # a run whose log is gone: the unknown field is named, with the hint
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(summary, bare / "run_summary.json")
    (bare / "run_summary.json").write_text(json.dumps({**json.loads(summary.read_text()), "log": "/nonexistent.txt"}))
    with pytest.raises(legality.CheckError, match=r"unknown to this train_gpt.py: \['demo_scale'\] \(an experiment"):
        legality.load_config(None, bare / "final_model.int6.ptz")


@pytest.mark.slow
def test_smoke_run_must_see_the_experiments_fields(demo_run: Path, tmp_path: Path, monkeypatch) -> None:
    # the sandbox stood in for by a recorded log: a packed file whose run did not log the entry's field is refused
    from tools import record_smoke
    from tools.sandbox import Observation

    packed = "print('packed')\n"
    rest = read_log(demo_run / "logs" / "demo.txt").split("=" * 100, 1)[1]
    rest = re.sub(r"bytes_code:\d+", f"bytes_code:{len(packed)}", rest)
    seen: list[dict] = []

    def fake_observe(files: dict[str, bytes], work: Path, extra_env: dict[str, str] | None = None, **kw: object):
        seen.append(extra_env)
        out = work / "sandbox/record/out"
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "final_model.int6.ptz").write_bytes(b"x")
        body = rest if extra_env else rest.replace("  demo_scale: 2.0\n", "")
        (out / "logs/smoke.txt").write_text(f"source_file: train_gpt.py bytes:{len(packed)}\n{packed}\n{'=' * 100}{body}")
        return Observation(ran=True, returncode=0, workdir=work / "sandbox")
    monkeypatch.setattr(record_smoke, "smoke_observe", fake_observe)
    fields = set(record_build.config_defaults((Path(train_gpt.__file__)).read_text()))
    ok = record_smoke.smoke_run(packed, tmp_path / "a", fields, extra_env={"DEMO_SCALE": "2.0"},
                                expect_fields=("demo_scale",))
    assert ok.bytes_code == len(packed) and seen == [{"DEMO_SCALE": "2.0"}]
    with pytest.raises(RecordError, match="logged no demo_scale among its Hyperparameters: the experiment's Config"):
        record_smoke.smoke_run(packed, tmp_path / "b", fields, expect_fields=("demo_scale",))
