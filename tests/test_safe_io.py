"""Reading a stranger's folder: regular files only, size caps before reading, no hang on a FIFO (tools/safe_io.py),
and the CLIs' one-line errors for such input."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.safe_io import MAX_LOG_BYTES, UnsafeFile, list_folder, read_bytes, read_log

ROOT = Path(__file__).resolve().parent.parent


def test_regular_file_is_read(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_bytes(b"x\r\ny\xff\n")
    assert read_bytes(tmp_path / "a.log", 100) == b"x\r\ny\xff\n"
    assert read_log(tmp_path / "a.log") == "x\r\ny\ufffd\n"  # bytes kept, undecodable replaced


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "train_seed1.log")  # nobody writes: a plain open() would block forever
    t = time.perf_counter()
    with pytest.raises(UnsafeFile, match="a FIFO"):
        read_log(tmp_path / "train_seed1.log")
    assert time.perf_counter() - t < 5


def test_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("token")
    (tmp_path / "train_seed1.log").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafeFile, match="a symlink"):
        read_log(tmp_path / "train_seed1.log")
    kinds = {e.name: e.kind for e in list_folder(tmp_path)}
    assert kinds == {"secret": "file", "train_seed1.log": "a symlink"}


def test_size_cap_is_checked_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "huge.log"
    with open(big, "wb") as f:  # sparse: 400 MB announced, nothing written
        f.truncate(400 * 2**20)
    with pytest.raises(UnsafeFile, match="over the .*cap"):
        read_log(big)
    assert MAX_LOG_BYTES < 400 * 2**20


def test_parse_log_cli_on_a_fifo_and_a_huge_log(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.log")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "parse_log.py"), str(tmp_path / "pipe.log")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "a FIFO" in proc.stderr and proc.stderr.count("\n") == 1
