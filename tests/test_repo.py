"""Repository contracts: the README's two commands and CI."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)]


def test_readme_first_two_commands() -> None:
    main_cmd, test_cmd = readme_commands()[:2]
    assert "\n" not in main_cmd and "\n" not in test_cmd  # one line each, copy-paste ready
    assert main_cmd.endswith("python tools/dryrun.py") and "pip install" in main_cmd
    assert test_cmd.endswith("python -m pytest -q") and "requirements-dev.txt" in test_cmd
    assert "pip install -q -e ." in main_cmd and "pip install -q -e ." in test_cmd  # no sys.path edits anywhere


def test_no_sys_path_edits() -> None:
    files = [p for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".") for p in d.rglob("*.py")]
    offenders = [str(p.relative_to(ROOT)) for p in [*files, ROOT / "train_gpt.py"]
                 if "sys.path.insert" in p.read_text(encoding="utf-8") and p.name != "test_repo.py"]
    assert offenders == []


def test_ci_runs_exactly_the_readme_test_command() -> None:
    test_cmd = readme_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_requirements_pin_torch() -> None:
    reqs = (ROOT / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in reqs  # installs the local CPU wheel here and PyPI's CUDA build on GPU machines
    assert not any(r.startswith("flash") for r in reqs)  # Hopper extras live in requirements-gpu.txt


def requirement_names(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines()
            if line.split("#")[0].strip() and not line.startswith("-")]


def test_gpu_requirements_pin_one_torch_with_its_fa3_wheel_and_the_same_rest() -> None:
    """One GPU install story: torch 2.9.1+cu128 and the FA3 wheel index built for exactly it (cu128_torch291);
    every other dependency identical to requirements.txt."""
    gpu, cpu = requirement_names(ROOT / "requirements-gpu.txt"), requirement_names(ROOT / "requirements.txt")
    assert [r for r in gpu if r.startswith("torch")] == ["torch==2.9.1+cu128"] and "flash_attn_3" in gpu
    assert "cu128_torch291" in (ROOT / "requirements-gpu.txt").read_text()
    assert [r for r in gpu if not r.startswith(("torch", "flash_attn"))] == [r for r in cpu if not r.startswith("torch")]
