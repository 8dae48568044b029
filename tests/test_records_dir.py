"""records/ in the repo: every committed folder passes the checker, and records/README.md's table is generated from
the submission.json files (tools/records_index.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.record_checks import Options, check_folder
from tools.records_index import BEGIN, END, index_table, record_folders, render, update_index
from tools.sandbox import sandbox_status
from tools.verdicts import format_rows, verdict

RECORDS = Path(__file__).resolve().parent.parent / "records"


@pytest.mark.parametrize("folder", record_folders(RECORDS), ids=lambda p: p.name)
def test_committed_record_checks_clean(folder: Path) -> None:
    rows = check_folder(folder, Options(run=sandbox_status() is None, timeout=600))
    assert verdict(rows) == ("PASS" if sandbox_status() is None else "WARN"), format_rows(rows)


def test_there_is_a_reference_cpu_record() -> None:
    names = [f.name for f in record_folders(RECORDS)]
    assert any(n.endswith("_CPUPipelineExample") for n in names), names


def test_readme_table_is_current() -> None:
    readme = (RECORDS / "README.md").read_text()
    assert f"{BEGIN}\n{index_table(RECORDS)}\n{END}" in readme, "run: python -c 'from tools.records_index import " \
                                                             "update_index; update_index(__import__(\"pathlib\")." \
                                                             "Path(\"records\"))'"


def test_index_generation(tmp_path: Path) -> None:
    folder = tmp_path / "track_10min_16mb" / "2026-05-01_Thing"
    folder.mkdir(parents=True)
    (folder / "submission.json").write_text(json.dumps({"name": "A | B", "val_bpb": 1.08123, "seeds": [1, 2, 3],
                                                        "bytes_total": 15990000, "hardware": "8xH100"}))
    (tmp_path / "track_10min_16mb" / "link").symlink_to(folder)  # not followed
    assert update_index(tmp_path) and not update_index(tmp_path)  # the second time nothing changes
    text = (tmp_path / "README.md").read_text()
    assert "| 10min_16mb | [2026-05-01_Thing](track_10min_16mb/2026-05-01_Thing/) | A / B | 1.0812 | 3 | " \
           "15,990,000 | 8xH100 |" in text and "link" not in text
    assert render(text, "new") == text.replace(index_table(tmp_path), "new")
