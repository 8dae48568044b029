"""tools/compare_runs.py: table rows for every log and a valid PNG, headless."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.compare_runs import focus_ylim, main
from tools.runplots import default_labels, format_table, stage_key, tokenizer_warning

ROOT = Path(__file__).resolve().parent.parent

ASSETS = ROOT / "tests" / "assets"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_table_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plots" / "cmp.png"
    logs = [ASSETS / "log_ours_wallclock.txt", ASSETS / "log_baseline.txt"]
    assert main([*map(str, logs), "--labels", "cpu_run", "naive", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rows = {line.split()[0]: line for line in text.splitlines()}
    assert "cpu_run" in rows and "naive" in rows
    assert "7" in rows["cpu_run"].split() and "150" in rows["cpu_run"].split()
    assert "259,999" in rows["cpu_run"] and "2.28889*" in rows["cpu_run"]  # final stage marked
    assert "385.01" in rows["cpu_run"] and "72.90" in rows["naive"]
    assert "1.84223*" in rows["naive"] and "1,670,456" in rows["naive"]
    assert "quantized sliding window" in text and "final int8 zlib roundtrip exact" in text  # normalized stages
    assert "WARNING: different tokenizers" in text  # CPU run (vocab 1024 builtin) vs the baseline's SP1024
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in out.parent.iterdir()] == ["cmp.png"]  # no temp file left behind


def test_default_output_next_to_first_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = shutil.copy(ASSETS / "log_record_p.txt", tmp_path / "a.txt")
    b = shutil.copy(ASSETS / "log_record_n.txt", tmp_path / "b.txt")
    assert main([str(a), str(b)]) == 0
    assert (tmp_path / "a_compare.png").read_bytes()[:8] == PNG_MAGIC
    out = capsys.readouterr().out
    assert out.splitlines()[2].split()[:3] == ["a", "314", "707"] and "1.32512*" in out


def test_bad_input_is_one_line_exit_2(tmp_path: Path) -> None:
    script = str(ROOT / "tools" / "compare_runs.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path / "missing.txt")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "missing.txt" in proc.stderr
    log = str(ASSETS / "log_baseline.txt")
    proc = subprocess.run([sys.executable, script, log, log, "--labels", "only_one"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--labels" in proc.stderr and "Traceback" not in proc.stderr


def test_focus_ylim_hides_the_step0_spike() -> None:
    lo, hi = focus_ylim([9.0, 12.4, 4.1, 3.3, 3.2, 3.1, 3.0, 2.9])
    assert lo < 2.9 and 3.3 < hi < 9.0
    assert focus_ylim([1.0]) is None


def _run(evals: dict[str, tuple[float, float]], vocab: int | None = 8192, val_points: int = 3) -> dict:
    final = list(evals)[-1]
    return dict(seed=1, steps=10, step_avg_ms=1.0, train_time_approx=False, bytes_total=1, final_label=final,
                final_val_loss=evals[final][0], final_val_bpb=evals[final][1],
                evals={k: dict(val_loss=v[0], val_bpb=v[1]) for k, v in evals.items()},
                hyperparameters={"vocab_size": vocab} if vocab else {}, val=[{}] * val_points, train=[])


def test_stage_names_share_one_column() -> None:
    assert stage_key("diagnostic pre-quantization post-ema") == stage_key("pre-quantization post-ema")
    assert stage_key("quantized_sliding_window") == stage_key("quantized sliding window")
    a = _run({"pre-quantization post-ema": (2.8, 1.087), "quantized_ttt": (2.79, 1.0808)})
    b = _run({"diagnostic pre-quantization post-ema": (2.8, 1.0871), "quantized_ttt": (2.79, 1.0809)})
    head = format_table(["a", "b"], [a, b]).splitlines()[0]
    assert head.count("pre-quantization post-ema") == 1 and "diagnostic" not in head


def test_tokenizer_mismatch_warned_and_single_points_noted() -> None:
    p = _run({"quantized_ttt": (2.7918, 1.0808)})  # 0.268 tokens/byte
    n = _run({"quantized_ttt_phased": (2.3194, 1.0599)}, val_points=1)  # CaseOps: 0.317 tokens/byte
    table = format_table(["P", "N"], [p, n])
    assert "WARNING: different tokenizers" in table and "not comparable" in table
    assert "single val point (drawn as a marker): N" in table
    assert tokenizer_warning(["P", "P2"], [p, _run({"quantized_ttt": (2.7920, 1.0809)})]) is None
    assert tokenizer_warning(["a", "b"], [p, _run({"x": (2.7918, 1.0808)}, vocab=1024)]) is not None


def test_default_labels_are_short() -> None:
    rec = Path("records/2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT/train_seed42.log")
    rec2 = Path("records/2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611/train_seed42.log")
    labels = default_labels([rec, rec2])
    assert len(set(labels)) == 2 and all(len(lab) <= 18 for lab in labels) and "2026" not in "".join(labels)
    assert default_labels([Path("x/run_seed1.txt"), Path("x/run_seed2.txt")]) == ["1", "2"]
