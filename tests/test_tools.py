"""tools/requantize.py and tools/dryrun.py (the README's main command)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import dryrun, requantize

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = re.compile(r"^dryrun: val_bpb=(\d+\.\d+) bytes_total=(\d+) limit=16000000 seconds=(\d+\.\d) record=(\S+)$")


def test_tiny_run_summary(tiny_run) -> None:
    s = tiny_run.summary
    assert list(s["evals"]) == ["pre-quantization post-ema", "quantized", "quantized_sliding_window",
                                "quantized_ttt_phased"]
    final = s["evals"]["quantized_ttt_phased"]
    assert s["final_label"] == "quantized_ttt_phased" and s["final_val_bpb"] == final["val_bpb"]
    assert s["bytes_model"] == (tiny_run.out_dir / "final_model.int6.ptz").stat().st_size
    assert s["bytes_total"] == s["bytes_code"] + s["bytes_model"] < 16_000_000
    assert {r["phase"] for r in s["time_ledger"]} >= {"train_loop", "gptq_hessians", "quantized_sliding_window",
                                                      "quantized_ttt_phased"}


def test_requantize_sweep(tiny_run, capsys) -> None:
    threads = torch.get_num_threads()

    def rows(*args: str) -> list[list[str]]:
        try:  # main() sets up the runtime like the trainer does (threads = cores), so restore them afterwards
            rc = requantize.main(["--checkpoint", str(tiny_run.out_dir / "final_model.pt"), *args])
        finally:
            torch.set_num_threads(threads)
        out = capsys.readouterr().out
        assert rc == 0, out
        return [line.split() for line in out.splitlines() if re.match(r"^\s+6\s", line)]

    swept = rows("--matrix-clip-sigmas", "6", "12.85", "--embed-bits", "8")
    assert len(swept) == 2
    sizes = {float(r[1]): int(r[5].replace(",", "")) for r in swept}
    assert sizes[6.0] > sizes[12.85]  # SDClip: a wider clip (coarser step) compresses smaller
    # the run's own settings (per-role sigmas, int7 embedding, LQER) reproduce the trainer's quantized score (up to
    # float32 reduction order: threads differ)
    own = rows()
    assert len(own) == 1
    trained = tiny_run.summary["evals"]["quantized"]["val_bpb"]
    assert float(own[0][8]) == pytest.approx(trained, abs=1e-5)


def test_requantize_missing_checkpoint(tmp_path, capsys) -> None:
    assert requantize.main(["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_dryrun_contract_line_format(tmp_path) -> None:
    line = dryrun.contract_line(1.23456789, 15_991_930, 171.04, tmp_path / "rec")
    m = CONTRACT.match(line)
    assert m and m.group(1) == "1.23456789" and m.group(2) == "15991930" and m.group(3) == "171.0"


def test_dryrun_env_file(tmp_path) -> None:
    env = dryrun.read_env_file(ROOT / "configs" / "cpu_tiny.env")
    assert env["VOCAB_SIZE"] == "1024" and "DATA_PATH" in env
    bad = tmp_path / "bad.env"
    bad.write_text("# ok\nNOT A PAIR\n")
    with pytest.raises(ValueError, match="bad.env:2"):
        dryrun.read_env_file(bad)


@pytest.mark.slow
def test_dryrun_end_to_end(tmp_path) -> None:
    """The README's first command, shortened: builtin data -> torchrun train -> record -> check -> contract line."""
    proc = subprocess.run([sys.executable, "tools/dryrun.py", "--seconds", "8", "--out", str(tmp_path / "dry")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = CONTRACT.match(proc.stdout.strip().splitlines()[-1])
    assert m, proc.stdout[-2000:]
    assert int(m.group(2)) < 16_000_000 and Path(m.group(4)).is_dir()
