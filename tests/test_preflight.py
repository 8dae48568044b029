"""tools/preflight.py: the go/no-go, on this CPU machine (emulated CUDA contracts) and with real steps at tiny size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn.functional as F
from conftest import TINY_TRAIN

import train_gpt
from tools import preflight_checks as pc

ROOT = Path(__file__).resolve().parent.parent


def test_verdict() -> None:
    go = [pc.Check("a", True, ""), pc.Check("b", None, "")]
    assert pc.verdict(go) == (True, "preflight: GO (1 checks passed, 1 info)")
    assert pc.verdict([*go, pc.Check("gpu count", False, "1 visible")]) == (False, "preflight: NO-GO (1 failed: gpu count)")


def test_emulated_model_is_go_and_catches_defect_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU check runs the model through the strict FA3 stand-in under CUDA's autocast policy; with the rms_norm /
    FA3-input pinning removed it reports the crash an 8xH100 run would have, as a no-go."""
    cfg = train_gpt.Config(**TINY_TRAIN)
    rows = pc.emulated_model(cfg)
    assert [r.ok for r in rows] == [None, True], rows
    monkeypatch.setattr(train_gpt, "rms_norm", lambda x: F.rms_norm(x, (x.size(-1),)))
    monkeypatch.setattr(train_gpt, "attention", lambda q, k, v, fa3=None, docs=None: fa3(q, k, v, causal=True))
    (bad,) = pc.emulated_model(cfg)
    assert bad.ok is False and "FlashAttention-3 would reject" in bad.detail


def test_real_steps_at_tiny_size_and_data_checks(tiny_dataset, tmp_path: Path) -> None:
    cfg = train_gpt.Config(**TINY_TRAIN, data_path=str(tiny_dataset.data_dir), tokenizer_path=str(tiny_dataset.tokenizer),
                           out_dir=str(tmp_path))
    (data_row,), loaded = pc.data(cfg, required=True)
    assert data_row.ok and loaded is not None and "train shards verified" in data_row.detail
    rows = pc.real_steps(cfg, train_gpt.Runtime())
    assert [r.ok for r in rows] == [True] and "written and reloaded" in rows[0].detail
    wrong = train_gpt.Config(**{**TINY_TRAIN, "vocab_size": 1024}, data_path=str(tiny_dataset.data_dir),
                             tokenizer_path=str(tiny_dataset.tokenizer))
    (row,), _ = pc.data(wrong, required=True)
    assert row.ok is False and "VOCAB_SIZE=1024" in row.detail


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/preflight.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)


def test_cli_no_go_exits_1_with_one_verdict_line(tmp_path: Path) -> None:
    env_file = tmp_path / "bad.env"
    env_file.write_text("ATTENTION=fa3\n")  # no FlashAttention-3 on this machine
    proc = run_cli("--env-file", str(env_file), "--skip-plan")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "preflight: NO-GO (1 failed: attention)"
    env_file.write_text("MODEL_DIMS=3\n")
    proc = run_cli("--env-file", str(env_file))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "preflight: unknown config env var MODEL_DIMS; did you mean MODEL_DIM?"


@pytest.mark.slow
def test_cli_on_cpu_at_record_size_is_go() -> None:
    """The README's promise: `python tools/preflight.py` on a CPU machine prints its verdict and exits 0 (the record's
    full-size model through the emulated CUDA contracts, the plan, and the projected artifact)."""
    proc = run_cli()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "35,945,671" in out and "emulated CUDA forward" in out and "plan: artifact" in out
    assert out.strip().splitlines()[-1].startswith("preflight: GO (")
