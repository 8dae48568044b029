"""tools/compare_runs.py: table rows for every log and a valid PNG, headless."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.compare_runs import focus_ylim, main

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
    assert "quantized_sliding_window" in text and "final_int8_zlib_roundtrip_exact" in text
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
