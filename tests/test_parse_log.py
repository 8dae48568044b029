"""tools/parse_log.py on hand-made samples of every log format (tests/assets/log_*.txt), and the log contract: every
kind of train_gpt.LOG_FORMATS parses back to the values it was written from. Upstream record shapes (baseline, P, N,
and the line shapes parse_log used to miss) are written and checked in tests/test_referee.py."""

from __future__ import annotations

import json
import math
import string
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt
from tools.log_lines import format_regex, match_ours
from tools.log_parser import SEP, parse_hyperparameters, parse_log, parse_value, split_header

ROOT = Path(__file__).resolve().parent.parent

ASSETS = ROOT / "tests" / "assets"


def parse_asset(name: str) -> dict:
    return parse_log((ASSETS / name).read_text())


def test_ours_wallclock_stop() -> None:
    r = parse_asset("log_ours_wallclock.txt")
    assert r["format"] == "ours"
    assert (r["seed"], r["steps"], r["iterations"], r["stop_reason"]) == (7, 150, 200, "wallclock_cap")
    assert r["train_time_ms"] == 57751.0 and r["train_time_approx"] is False
    assert r["step_avg_ms"] == pytest.approx(57751.0 / 150)
    assert list(r["evals"]) == ["pre-quantization post-ema", "quantized", "quantized_sliding_window", "quantized_ttt"]
    assert r["evals"]["quantized_sliding_window"] == {"val_loss": 3.9811204, "val_bpb": 2.29518422,
                                                      "eval_time_ms": 20544.0, "name": "quantized_sliding_window",
                                                      "attrs": {}, "note": "", "order": 2}
    assert (r["final_label"], r["final_val_bpb"], r["final_val_loss"]) == ("quantized_ttt", 2.28888888, 3.97020019)
    assert (r["bytes_code"], r["bytes_model"], r["bytes_total"]) == (61234, 198765, 259999)
    assert r["bytes_model_raw"] == 1019431 and r["artifact_scheme"] == "quantized+brotli"
    assert (r["model_params"], r["world_size"], r["grad_accum_steps"]) == (254016, 2, 4)
    assert r["runtime"] == {"device": "cpu", "attention": "sdpa", "compile": False}
    assert (r["train_shards"], r["val_tokens"], r["layer_loop_step"]) == (1, 65537, 53)
    assert (r["gptq_reserve_s"], r["gptq_hessians_s"]) == (2.0, 1.9)
    assert (r["python_version"], r["torch_version"]) == ("3.11.7", "2.13.0+cpu")
    assert r["time_ledger"][0] == {"phase": "compile_warmup", "seconds": 0.0, "budget": "none"}
    assert {"phase": "quantized_ttt", "seconds": 61.23, "budget": "eval"} in r["time_ledger"]
    assert len(r["time_ledger"]) == 8
    assert r["time_totals"] == {"train": 59.651, "eval": 81.774, "limit": 600.0}


def test_ours_source_section_is_not_parsed() -> None:
    # the asset's source docstring holds decoy log lines (seed 999, bpb 9.99, bytes_total:1, decoy_label, ...)
    r = parse_asset("log_ours_wallclock.txt")
    assert "decoy_label" not in r["evals"]
    assert r["seed"] == 7 and r["hyperparameters"]["seed"] == 7
    assert r["bytes_total"] == 259999 and r["final_val_bpb"] < 9
    assert [v["step"] for v in r["val"]] == [0, 100, 150]


def test_ours_hyperparameters_are_typed() -> None:
    hp = parse_asset("log_ours_wallclock.txt")["hyperparameters"]
    assert hp["adam_eps"] == 1e-08 and isinstance(hp["adam_eps"], float)
    assert hp["iterations"] == 200 and isinstance(hp["iterations"], int)
    assert hp["max_wallclock_seconds"] == 60.0 and isinstance(hp["max_wallclock_seconds"], float)
    assert hp["ttt_enabled"] is True and hp["sliding_window_enabled"] is True
    assert hp["compile"] == "auto" and hp["data_dir"] == "./data/" and hp["tokenizer_path"] == ""
    assert list(hp) == sorted(hp)


def test_ours_curves_times_from_tok_s() -> None:
    r = parse_asset("log_ours_wallclock.txt")
    train = {p["step"]: p for p in r["train"]}
    assert sorted(train) == [1, 2, 3, 4, 5, 50, 100, 150]
    # 150 steps x 16384 tokens at 42556 tok/s = 57.75 s, where the line only says 1.0m
    assert train[150]["train_time_ms"] == pytest.approx(150 * 16384 / 42556 * 1000, abs=0.1)
    assert train[150]["time_approx"] is False and train[150]["tok_s"] == 42556
    assert train[100]["train_loss"] == 4.2035
    val = {p["step"]: p for p in r["val"]}
    assert val[0]["train_time_ms"] == 0.0 and val[0]["val_bpb"] == 4.0011
    assert val[100]["train_time_ms"] == train[100]["train_time_ms"]
    assert val[150]["train_time_ms"] == 57751.0  # the stop line is exact


def test_ours_iteration_stop_uses_ledger_and_final_val_step() -> None:
    r = parse_asset("log_ours_iterations.txt")
    assert (r["seed"], r["steps"], r["iterations"], r["stop_reason"]) == (1234, 20, 20, "iterations")
    assert r["train_time_ms"] == 8512.0 and r["train_time_approx"] is False  # time_ledger train_loop
    assert r["step_avg_ms"] == pytest.approx(425.6)
    # no sliding window, no TTT: the last stage is the plain quantized eval
    assert (r["final_label"], r["final_val_bpb"]) == ("quantized", 2.62610203)
    assert r["val"][-1] == {"step": 20, "val_loss": 4.5123, "val_bpb": 2.6044, "train_time_ms": 8512.0,
                            "time_approx": False}
    assert r["time_totals"]["eval"] == 0.0


def test_iteration_stop_without_ledger_is_estimated() -> None:
    text = (ASSETS / "log_ours_iterations.txt").read_text()
    text = "\n".join(line for line in text.splitlines() if not line.startswith("time_ledger"))
    r = parse_log(text)
    # last timed step line is step 15 (6384 ms); scaled to the 20 steps reached, and flagged
    assert r["train_time_ms"] == pytest.approx(6384.0 * 20 / 15, rel=1e-4)
    assert r["train_time_approx"] is True


def test_record_p_console_log() -> None:
    r = parse_asset("log_record_p.txt")
    assert r["format"] == "record"
    assert (r["seed"], r["steps"], r["iterations"], r["train_time_ms"]) == (314, 707, 1000, 586812.0)
    assert (r["world_size"], r["grad_accum_steps"]) == (8, 1)  # from the hyperparameter dump
    assert (r["train_shards"], r["val_tokens"], r["model_params"]) == (12, 2097152, 9876543)
    assert r["final_label"] == "quantized_ttt" and r["final_val_bpb"] == 1.20660123
    assert r["evals"]["quantized_sliding_window"]["val_bpb"] == 1.209667
    assert (r["bytes_code"], r["bytes_model"], r["bytes_total"]) == (17002, 7012345, 7029347)
    assert r["time_ledger"] == [] and r["time_totals"] is None
    assert r["torch_version"] is None  # console capture: no header
    assert r["layer_loop_step"] == 351 and r["peak_mem_allocated_mib"] == 21011
    # val at step 400 gets the time of the step-400 train line (400 x 131072 / 157918 tok/s)
    val400 = next(p for p in r["val"] if p["step"] == 400)
    assert val400["train_time_ms"] == pytest.approx(400 * 131072 / 157918 * 1000, abs=0.1)


def test_record_torchrun_warnings_ignored() -> None:
    text = (ASSETS / "log_record_p.txt").read_text()
    assert text.startswith("W1102 ")
    noisy = text.replace("0/1000 val_loss: 8.3107", "W1102 07:15:03.481000 3117 x.py:1] 0/1000 val_loss: 1.0\n"
                         "0/1000 val_loss: 8.3107")
    assert parse_log(noisy)["val"][0]["val_bpb"] == 3.2119
    assert len(parse_log(noisy)["val"]) == 3


def test_record_minutes_fallback_without_batch_tokens() -> None:
    text = (ASSETS / "log_record_p.txt").read_text().replace("  train_batch_tokens: 131072\n", "")
    r = parse_log(text)
    p300 = next(p for p in r["train"] if p["step"] == 300)
    assert p300["train_time_ms"] == pytest.approx(4.2 * 60000) and p300["time_approx"] is True
    assert r["train_time_ms"] == 586812.0  # the stop line stays exact


def test_record_inconsistent_tok_s_falls_back_to_minutes() -> None:
    text = (ASSETS / "log_record_p.txt").read_text().replace("train_time: 4.2m tok/s: 157918", "train_time: 4.2m tok/s: 99")
    p300 = next(p for p in parse_log(text)["train"] if p["step"] == 300)
    assert p300["train_time_ms"] == pytest.approx(4.2 * 60000) and p300["time_approx"] is True


def test_record_n_logfile_with_embedded_source() -> None:
    r = parse_asset("log_record_n.txt")
    assert (r["seed"], r["steps"], r["train_time_ms"]) == (0, 631, 599450.0)
    assert r["hyperparameters"]["compressor"] == "pergroup" and r["hyperparameters"]["artifact_dir"] == ""
    assert "import os" not in r["hyperparameters"] and len(r["hyperparameters"]) == 10
    assert (r["bytes_code"], r["bytes_code_uncompressed"]) == (29876, 140123)  # compressed code counts
    assert (r["bytes_model"], r["bytes_total"], r["artifact_scheme"]) == (8123456, 8153332, "quantized+pergroup")
    assert list(r["evals"]) == ["diagnostic pre-quantization post-ema", "diagnostic quantized", "quantized_ttt_phased"]
    assert (r["final_label"], r["final_val_bpb"]) == ("quantized_ttt_phased", 1.32512345)  # not the source's 0.1
    assert r["total_eval_time_s"] == 412.3
    assert r["torch_version"] == "2.9.1+cu128"
    assert r["val"] == [{"step": 631, "val_loss": 2.9404, "val_bpb": 1.339, "train_time_ms": 599450.0,
                         "time_approx": False}]


def test_baseline_format() -> None:
    r = parse_asset("log_baseline.txt")
    assert r["format"] == "baseline"
    assert (r["seed"], r["steps"], r["iterations"], r["train_time_ms"]) == (1337, 412, 500, 30033.0)
    assert r["hyperparameters"] == {} and r["train_batch_tokens"] == 65536
    assert (r["train_shards"], r["val_tokens"], r["model_params"]) == (3, 1048576, 1703936)
    assert (r["world_size"], r["grad_accum_steps"]) == (1, 8)
    assert r["final_label"] == "final_int8_zlib_roundtrip_exact"
    assert (r["final_val_loss"], r["final_val_bpb"]) == (3.11018765, 1.84223456)
    assert r["evals"]["final_int8_zlib_roundtrip"]["eval_time_ms"] == 912.0
    assert r["evals"]["final_int8_zlib_roundtrip_exact"]["eval_time_ms"] is None
    # the compressed total counts, not the raw "Total submission size: N bytes"
    assert (r["bytes_code"], r["bytes_model"], r["bytes_total"]) == (47000, 1623456, 1670456)
    assert r["bytes_model_raw"] == 6871234 and r["artifact_scheme"] == "int8+zlib"
    assert r["train"][0] == {"step": 1, "train_loss": 6.9355, "train_time_ms": 81.0, "tok_s": None,
                             "time_approx": False}
    assert [(p["step"], p["train_time_ms"]) for p in r["val"]] == [(0, 0.0), (200, 14640.0), (412, 30033.0)]


def test_split_header_layouts() -> None:
    run = ["Running Python 3.11", "Running PyTorch 2.13"]
    ours = ["src", "more src", SEP, *run, SEP, "log"]
    assert split_header(ours) == (run, ["log"])
    n_style = [SEP, "Hyperparameters:", "  a: 1", "import os", SEP, *run, SEP, "log"]
    assert split_header(n_style) == (["Hyperparameters:", "  a: 1", "import os", SEP, *run], ["log"])
    assert split_header(["log1", "log2"]) == ([], ["log1", "log2"])
    assert split_header(["src", SEP, "log"]) == ([], ["log"])  # no version block: after the first separator
    assert parse_hyperparameters(n_style) == {"a": 1}


def test_parse_value() -> None:
    assert parse_value("42") == 42 and parse_value("-3") == -3
    assert parse_value("0.35") == 0.35 and parse_value("1e-08") == 1e-08
    assert parse_value("True") is True and parse_value("False") is False and parse_value("None") is None
    assert parse_value("1_000") == "1_000" and parse_value("./data/") == "./data/"
    assert math.isnan(parse_value("nan"))


def test_empty_text() -> None:
    r = parse_log("")
    assert r["format"] is None and r["steps"] is None and r["final_val_bpb"] is None and r["evals"] == {}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "parse_log.py"), *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_cli_one_json_per_log(tmp_path: Path) -> None:
    diverged = tmp_path / "diverged.txt"
    diverged.write_text("1/10 train_loss: nan train_time: 0.0m tok/s: 100\n")
    proc = run_cli(str(ASSETS / "log_ours_wallclock.txt"), str(ASSETS / "log_baseline.txt"), str(diverged))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["seed"] for r in rows] == [7, 1337, None]
    assert rows[0]["log"].endswith("log_ours_wallclock.txt") and rows[0]["final_val_bpb"] == 2.28888888
    assert rows[2]["train"][0]["train_loss"] is None  # NaN becomes null: strict JSON
    compact = json.loads(run_cli("--no-curves", str(ASSETS / "log_baseline.txt")).stdout)
    assert "train" not in compact and compact["bytes_total"] == 1670456


def test_cli_missing_file(tmp_path: Path) -> None:
    proc = run_cli(str(ASSETS / "log_baseline.txt"), str(tmp_path / "nope.txt"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "nope.txt" in proc.stderr and "Traceback" not in proc.stderr


SAMPLE_VALUES = dict(  # one value per field name used by LOG_FORMATS, typed as the trainer passes them
    name="quant/gptq.py", n=12345, sha256="ab" * 32, vocab=8192, world_size=8, accum=1, device="cuda", cpus=208,
    attention="fa3", compile=True, precision="bf16", seconds=12.5, ms=588047.0, label="quantized_ttt", k=3,
    step=4550, iterations=20000, val_loss=2.79180191, val_bpb=1.08079352, train_loss=2.8123, minutes=9.8, tok_s=6080000,
    frac=0.35, encoder="[0, 1, 2]", decoder="[3, 4]", allocated=39046, reserved=39070, done=40, wanted=64, limit=600.0,
    codec="brotli", part="total", docs=50000, prefix=2000, suffix=48000, phases=3, boundaries=[666, 1333, 2000],
    scored=704, phase="quantized_ttt_phased", budget="eval", train=599.9, eval=487.5, source="sidecar", total=151074498)


@pytest.mark.parametrize("kind", sorted(set(train_gpt.LOG_FORMATS) - {"eval", "warmup", "source_file"}))
def test_every_log_format_parses_back(kind: str) -> None:
    fields = {name for _, name, _, _ in string.Formatter().parse(train_gpt.LOG_FORMATS[kind]) if name}
    line = train_gpt.log_line(kind, **{k: SAMPLE_VALUES[k] for k in fields})
    got = match_ours(kind, line)
    assert got is not None, line
    for k in fields:
        want = SAMPLE_VALUES[k]
        if isinstance(want, int | float) and not isinstance(want, bool):
            assert got[k] == pytest.approx(want, rel=1e-3, abs=0.051), (k, line)
        else:
            assert str(got[k]) == str(want), (k, line)


def test_our_eval_and_source_lines_parse_back() -> None:
    line = train_gpt.log_line("eval", label="quantized_sliding_window", val_loss=2.79714850, val_bpb=1.08286335, ms=120961)
    p = parse_log(line + "\n")
    assert p["evals"]["quantized_sliding_window"]["val_bpb"] == 1.08286335 and p["final_val_bpb"] == 1.08286335
    assert p["evals"]["quantized_sliding_window"]["eval_time_ms"] == 120961.0
    head = train_gpt.log_line("source_file", name="train_gpt.py", n=6)
    assert parse_log(f"{head}\nx = 1\n\n")["sources"] == {"train_gpt.py": "x = 1\n"}


def test_parsers_follow_the_trainer_formats(monkeypatch) -> None:
    # the parser is built from LOG_FORMATS: a changed format is parsed by the rebuilt pattern, the old line is not
    changed = train_gpt.LOG_FORMATS["ledger"].replace("time_ledger phase:", "ledger phase=")
    pattern = format_regex(changed)
    assert pattern.match("ledger phase=train_loop seconds:1.000 budget:train")
    assert not pattern.match("time_ledger phase:train_loop seconds:1.000 budget:train")


def framed(name: str, body: str) -> str:
    return f"source_file: {name} bytes:{len(body.encode('utf-8'))}\n{body}\n"


def test_source_framing_is_byte_exact() -> None:
    # a source that imitates the log: separator + version block, log lines, a fake frame header, no final newline,
    # and multi-byte UTF-8 (the frame counts bytes, not characters)
    tricky = (f'"""décor ▁ ✓\n{SEP}\nRunning Python 9.9\n{SEP}\n0/9 val_loss: 9.9999 val_bpb: 9.9999\n'
              f'quantized_ttt val_loss:9.99999999 val_bpb:9.99999999 eval_time:1ms\nbytes_total:1\n'
              f'source_file: quant/evil.py bytes:3\n"""\nx = 1')
    plain = "import os\n\n\n"  # ends in blank lines: the frame, not a strip(), delimits it
    log_text = (ASSETS / "log_ours_iterations.txt").read_text()
    _, rest = log_text.split(SEP + "\n", 1)  # the asset's own (unframed) source is replaced by frames
    text = framed("train_gpt.py", tricky) + framed("quant/gptq.py", plain) + SEP + "\n" + rest
    r = parse_log(text)
    assert r["sources"] == {"train_gpt.py": tricky, "quant/gptq.py": plain}
    assert r["code_bytes_logged"] == len(tricky.encode()) + len(plain.encode()) and r["sources_error"] is None
    assert r["final_val_bpb"] == 2.62610203 and "decoy" not in str(r["evals"])  # the log proper, not the source
    assert r["bytes_total"] != 1 and r["python_version"] != "9.9"
    # a frame cut short (crashed writer) is reported, and what was read so far is kept
    broken = parse_log(framed("train_gpt.py", plain) + f"source_file: quant/x.py bytes:{10**6}\nabc\n")
    assert broken["sources"] == {"train_gpt.py": plain} and "quant/x.py" in broken["sources_error"]
    assert parse_log(log_text)["sources"] == {} and parse_log(log_text)["code_bytes_logged"] is None


def test_read_log_keeps_bytes(tmp_path: Path) -> None:
    from tools.parse_log import read_log
    body = "a = 1\r\nb = 2\r\n"  # CRLF inside a source must survive reading: the frame counts its bytes
    path = tmp_path / "crlf.txt"
    path.write_bytes(framed("train_gpt.py", body).encode() + (SEP + "\n").encode())
    assert parse_log(read_log(path))["sources"] == {"train_gpt.py": body}


def test_gpu_rows_from_the_nvidia_smi_header() -> None:
    smi = ("+-----------------------------------------------------------------------------------------+\n"
           "| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |\n"
           "|=========================================+========================+======================|\n"
           "|   0  NVIDIA H100 80GB HBM3          On  |   00000000:18:00.0 Off |                    0 |\n"
           "| N/A   33C    P0            119W /  700W |    1234MiB /  81559MiB |      0%      Default |\n"
           "|   1  NVIDIA H100 80GB HBM3          On  |   00000000:2A:00.0 Off |                    0 |\n")
    text = f"src\n{SEP}\nRunning Python 3.11.7\nRunning PyTorch 2.9.1+cu128\n{smi}{SEP}\nlog\n"
    assert parse_log(text)["gpus"] == ["NVIDIA H100 80GB HBM3"] * 2
    assert parse_log(f"{SEP}\nRunning Python 3.11\nnvidia-smi: not available (CPU run)\n{SEP}\n")["gpus"] == []


def test_cli_prints_source_sizes_not_text(tmp_path: Path) -> None:
    log = tmp_path / "framed.txt"
    log.write_text(framed("train_gpt.py", "x = 'é'\n") + SEP + "\n")
    row = json.loads(run_cli(str(log)).stdout)
    assert row["sources"] == {"train_gpt.py": 9} and row["code_bytes_logged"] == 9


@pytest.mark.parametrize("name", ["log_record_n.txt", "log_record_p.txt", "log_baseline.txt"])
def test_float_timestamp_before_every_line_changes_nothing(name: str) -> None:
    # some upstream loggers put `1776142356.999 ` before every line, the header's and the `  key: value` dump's too
    text = (ASSETS / name).read_text()
    stamped = "".join(f"{1776142356 + i * 0.137:.3f} {line}\n" for i, line in enumerate(text.splitlines()))
    plain, r = parse_log(text), parse_log(stamped)
    assert r == plain
    assert plain["python_version"] or plain["seed"] is not None  # the comparison covers identity fields
    if name != "log_baseline.txt":
        assert plain["hyperparameters"] and plain["world_size"] == 8 and plain["train_batch_tokens"]


def test_timestamp_takes_one_space_only() -> None:
    from tools.log_lines import clean_line
    assert clean_line("1776142356.274   adam_eps: 1e-08") == "  adam_eps: 1e-08"
    assert clean_line("1776142356 quantized val_loss:2.0 val_bpb:1.1\r") == "quantized val_loss:2.0 val_bpb:1.1"
    assert clean_line("  adam_eps: 1e-08") == "  adam_eps: 1e-08"


def test_forced_gate_scores_are_never_the_submitted_score() -> None:
    """The hybrid experiment's forced-gate scores evaluate the artifact with its gate overridden: not submittable,
    wherever they sit in the log."""
    from tools.log_lines import submittable
    from tools.log_parser import select_final

    assert not submittable("quantized_gate1") and not submittable("quantized_gate0")
    assert submittable("quantized") and submittable("quantized_ttt_phased")
    evals = {lab: dict(val_bpb=b, order=i) for i, (lab, b) in enumerate(
        (("quantized", 2.4), ("quantized_ttt_phased", 2.3), ("quantized_gate1", 2.9), ("quantized_gate0", 2.7)))}
    assert select_final(dict(evals=evals))[0] == "quantized_ttt_phased"
