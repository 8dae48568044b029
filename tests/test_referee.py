"""The referee on the shapes upstream record folders take, and on hostile scripts.

Every folder here is written by the test from the formats (no upstream file is copied): the organizers' baseline,
records P and N, step-granular timing, the non-record track, other log names and submission.json spellings, PEP 701
scripts, wrapper variants, the compressed-code convention, parse_log's missed line shapes, the sibling-exec stub, and
one hostile script per bypass, each with the verdict it must get. The hostile scripts only ever run in the sandbox.
"""

from __future__ import annotations

import base64
import json
import marshal
import sysconfig
from pathlib import Path

import pytest

from tools.log_parser import parse_log, select_final
from tools.record_checks import Options, check_folder, check_observation
from tools.record_pack import pack
from tools.sandbox import base_env, run_sandboxed, sandbox_status
from tools.script_scan import scan_script
from tools.verdicts import Row, verdict

NO_SANDBOX = sandbox_status()
needs_sandbox = pytest.mark.skipif(NO_SANDBOX is not None, reason=f"no sandbox: {NO_SANDBOX}")
SEP = "=" * 100
TORCHRUN = ("W0409 04:38:18.092000 206 torch/distributed/run.py:803] \n"
            "W0409 04:38:18.092000 206 torch/distributed/run.py:803] Setting OMP_NUM_THREADS environment variable\n")


def check(folder: Path) -> list[Row]:
    return check_folder(folder, Options(run=False))


def status(rows: list[Row], check_name: str, seed: str = "") -> list[str]:
    return [r.status for r in rows if r.check == check_name and r.seed == seed]


def write(folder: Path, files: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(body if isinstance(body, bytes) else body.encode())
    return folder


def plain_script(size: int) -> str:
    head = "import torch\nprint('a record')\n"
    return head + "#" * (size - len(head) - 1) + "\n"


# --- log writers in the upstream formats ----------------------------------------------------------------------------

def baseline_log(stop_ms: int = 600038, steps: int = 13780, model: int = 15815847, code: int = 47642,
                 bpb: float = 1.2243657, seed: int = 1337) -> str:
    avg = stop_ms / steps
    return (f"{TORCHRUN}seed:{seed}\ntrain_batch_tokens:524288 train_seq_len:1024 iterations:20000 warmup_steps:20\n"
            f"step:200/20000 train_loss:2.9 train_time:{avg * 200:.0f}ms step_avg:{avg:.2f}ms\n"
            f"step:{steps}/20000 val_loss:2.0606 val_bpb:1.2172 train_time:{stop_ms}ms step_avg:{avg:.2f}ms\n"
            f"stopping_early: wallclock_cap train_time:{stop_ms}ms step:{steps}/20000\n"
            f"Serialized model: 67224983 bytes\nCode size: {code} bytes\n"
            f"Serialized model int8+zlib: {model} bytes (payload:17178912 raw_torch:17224025 payload_ratio:3.91x)\n"
            f"Total submission size int8+zlib: {model + code} bytes\n"
            f"final_int8_zlib_roundtrip val_loss:2.0727 val_bpb:{bpb:.4f} eval_time:1401ms\n"
            f"final_int8_zlib_roundtrip_exact val_loss:2.07269931 val_bpb:{bpb:.8f}\n")


def record_log(seed: int, bpb: dict[str, float], stop_ms: float = 588047, steps: int = 4550, code: int = 16630,
               model: int = 15975300, hessians: float | None = 12.7, scheme: str = "brotli",
               compressed_code: int | None = None, total_eval: float | None = None, prefix: str = "",
               eval_ms: float = 120000.0) -> str:
    """P/N style: Hyperparameters block, `S/N` step lines, labelled score lines (`label -> bpb`, in order)."""
    tok_s = steps * 786432 / (stop_ms / 1000)
    lines = [*TORCHRUN.splitlines(), "Hyperparameters:", f"  seed: {seed}", "  train_batch_tokens: 786432",
             "  iterations: 20000", "train_shards: 128", "val_tokens: 40540160", "model_params:35944536",
             "0/20000 val_loss: 9.0090 val_bpb: 3.4877",
             f"{steps}/20000 train_loss: 2.8 train_time: {stop_ms / 60000:.1f}m tok/s: {tok_s:.0f}",
             f"{steps}/20000 val_loss: 2.8119 val_bpb: 1.0886",
             f"stopping_early: wallclock_cap train_time: {stop_ms:.0f}ms step: {steps}/20000",
             "peak memory allocated: 39046 MiB reserved: 39070 MiB", "Serialized model: 135431033 bytes"]
    if compressed_code is None:
        lines.append(f"Code size: {code} bytes")
    else:
        lines += [f"Code size (uncompressed): {code} bytes", f"Code size (compressed): {compressed_code} bytes"]
    if hessians is not None:
        lines.append(f"GPTQ:collected 67 Hessians in {hessians}s")
    counted = compressed_code if compressed_code is not None else code
    lines += [f"Serialized model quantized+{scheme}: {model} bytes",
              f"Total submission size quantized+{scheme}: {model + counted} bytes"]
    lines += [f"{prefix}{label} val_loss:{2.2 * b:.8f} val_bpb:{b:.8f} eval_time:{eval_ms:.0f}ms"
              for label, b in bpb.items()]
    if total_eval is not None:
        lines.append(f"total_eval_time:{total_eval:.1f}s")
    return "\n".join(lines) + "\n"


def p_folder(root: Path, seeds=(42, 314, 999), **kw) -> Path:
    finals = {42: 1.08079352, 314: 1.08103103, 999: 1.08118408, 7: 1.08100000}
    logs = {f"train_seed{s}.log": record_log(s, {"pre-quantization post-ema": finals[s] + 0.0067,
                                                  "quantized": finals[s] + 0.0189,
                                                  "quantized_sliding_window": finals[s] + 0.002,
                                                  "quantized_ttt": finals[s]}, **kw) for s in seeds}
    mean = sum(finals[s] for s in seeds) / len(seeds)
    sub = {"author": "x", "github_id": "x", "name": "P", "track": "10min_16mb", "val_bpb": round(mean, 5),
           "seeds": list(seeds), "seed_results": {str(s): {"val_bpb": round(finals[s], 5),
                                                         "artifact_bytes": 15991930} for s in seeds}}
    script = pack("import torch\n" + "x = 1\n" * 10)  # an lzma+b85 wrapper, as P ships
    return write(root / "records/track_10min_16mb/2026-04-09_P", {**logs, "submission.json": json.dumps(sub),
                                                                  "train_gpt.py": script})


# --- upstream shapes: no false alarms --------------------------------------------------------------------------------

def test_the_organizers_baseline_passes(tmp_path: Path) -> None:
    sub = {"author": "Baseline", "github_id": "openai", "name": "Naive Baseline", "date": "2026-03-18T14:56:29Z",
           "val_loss": 2.07269931, "val_bpb": 1.2243657, "bytes_total": 15863489, "bytes_code": 47642}
    folder = write(tmp_path / "records/track_10min_16mb/2026-03-17_NaiveBaseline",
                   {"train.log": baseline_log(), "submission.json": json.dumps(sub), "train_gpt.py": plain_script(47642),
                    "README.md": "# baseline\n"})
    rows = check(folder)
    assert verdict(rows) in ("PASS", "WARN") and not [r for r in rows if r.status == "FAIL"]
    assert status(rows, "size", "1337") == ["PASS"] and status(rows, "train time", "1337") == ["PASS"]
    assert status(rows, "json val_bpb (mean)") == ["PASS"]
    score = next(r.value for r in rows if r.check == "score")
    assert score.startswith("final_int8_zlib_roundtrip_exact")
    assert "folder path" in next(r.value for r in rows if r.check == "track")


def test_record_p_warns_on_hessians_after_the_cap_only(tmp_path: Path) -> None:
    rows = check(p_folder(tmp_path))
    assert verdict(rows) == "WARN" and not [r for r in rows if r.status == "FAIL"]
    assert status(rows, "train time", "42") == ["PASS"] and status(rows, "train+Hessians time", "42") == ["WARN"]
    assert status(rows, "json val_bpb", "314") == ["PASS"] and status(rows, "json val_bpb (mean)") == ["PASS"]
    assert "lzma" in next(r.value for r in rows if r.check == "script")


@pytest.mark.parametrize("stop_ms", [600020, 600140])
def test_step_granular_stop_past_the_cap_passes(tmp_path: Path, stop_ms: int) -> None:
    rows = check(p_folder(tmp_path, seeds=(42,), stop_ms=stop_ms, steps=4932, hessians=None))
    assert status(rows, "train time", "42") == ["PASS"]
    rows = check(p_folder(tmp_path / "b", seeds=(42,), stop_ms=601500, steps=4932, hessians=None))
    assert status(rows, "train time", "42") == ["FAIL"]  # 1.5 s is ~12 steps past the cap


def test_non_record_track_has_no_600s_rule(tmp_path: Path) -> None:
    folder = p_folder(tmp_path, seeds=(42,), stop_ms=3_600_000, steps=30000)
    sub = json.loads((folder / "submission.json").read_text())
    (folder / "submission.json").write_text(json.dumps({**sub, "track": "non_record_16mb"}))
    rows = check(folder)
    assert status(rows, "train time", "42") == ["INFO"] and not [r for r in rows if r.status == "FAIL"]


def test_record_n_compressed_code_convention_and_phased_ttt(tmp_path: Path) -> None:
    bpbs = {42: 1.05989454, 0: 1.06124613}
    logs = {f"train_seed{s}.log": record_log(s, {"diagnostic pre-quantization post-ema": b + 0.004,
                                                  "diagnostic quantized": b + 0.013, "quantized_ttt_phased": b},
                                             stop_ms=599592, steps=4945, code=157868, compressed_code=31999,
                                             model=15865260, hessians=4.7, scheme="pergroup", total_eval=508.8)
            for s, b in bpbs.items()}
    sub = {"track": "10min_16mb", "val_bpb": sum(bpbs.values()) / 2, "seeds": [42, 0],
           "seed_results": {str(s): {"val_bpb": b, "val_loss": round(2.2 * b, 8), "steps": 4945} for s, b in bpbs.items()},
           "bytes_total": 15897259}
    folder = write(tmp_path / "n", {**logs, "submission.json": json.dumps(sub), "train_gpt.py": plain_script(157868)})
    rows = check(folder)
    assert not [r for r in rows if r.status == "FAIL"], [r for r in rows if r.status == "FAIL"]
    size = next(r for r in rows if r.check == "size" and r.seed == "42")
    assert size.status == "PASS" and "Code size (compressed)" in size.value
    assert status(rows, "eval time", "0") == ["PASS"] and "total_eval_time" in next(
        r.value for r in rows if r.check == "eval time")
    assert "quantized_ttt_phased" in next(r.value for r in rows if r.check == "score" and r.seed == "42")


def test_other_log_names_and_submission_spellings(tmp_path: Path) -> None:
    logs = {"seed1337.txt": record_log(1337, {"quantized_sliding_window": 1.1001}),
            "logs/2f1c-uuid.txt": record_log(2025, {"quantized_sliding_window": 1.1003}),
            "requirements.txt": "torch\n"}
    totals = [16630 + 15975300] * 2
    sub = {"track": "10min_16mb", "val_bpb": 1.1002, "seeds": {"1337": 1.1001, "2025": 1.1003},
           "seed_scores": {"1337": {"bpb": 1.1001}}, "bytes_total": sum(totals) // 2 + 5}
    folder = write(tmp_path / "odd", {**logs, "submission.json": json.dumps(sub), "train_gpt.py": plain_script(16630)})
    rows = check(folder)
    assert not [r for r in rows if r.status == "FAIL"]
    assert status(rows, "json val_bpb", "1337") == ["PASS"] and status(rows, "json val_bpb", "2025") == ["PASS"]
    assert status(rows, "json bytes_total") == ["WARN"]  # not the max over seeds
    # per-seed values only in the logs, and a mean printed with fewer decimals than the logs: no alarm
    (folder / "submission.json").write_text(json.dumps({"track": "10min_16mb", "val_bpb": 1.1002}))
    rows = check(folder)
    assert status(rows, "json val_bpb (mean)") == ["PASS"] and not [r for r in rows if r.status == "FAIL"]


def test_pep701_script_is_scanned_not_crashed(tmp_path: Path) -> None:
    folder = p_folder(tmp_path, seeds=(42,))
    (folder / "train_gpt.py").write_text('import socket\nx = {"a": 1}\nprint(f"{x["a"]}")\n' + "y = 2\n" * 100)
    rows = check(folder)
    assert any(r.check == "script parse" for r in rows)
    assert any(r.check == "can: network" and "socket" in r.value for r in rows)  # still described
    assert status(rows, "size", "42") == ["PASS"]


def test_wrapper_variants_decode() -> None:
    packed = pack("import os\nos.system('echo hi')\n")
    variants = ["#!/usr/bin/env python3\n# -*- coding: utf-8 -*-\n" + packed,
                packed + "print('done')\n",
                packed.replace('exec(L.decompress(B.b85decode("', 'P="').replace(
                    '"),format=L.FORMAT_RAW', '"\nexec(L.decompress(B.b85decode(P),format=L.FORMAT_RAW'),
                "import base64,zlib\nexec(zlib.decompress(base64.b64decode(" + repr(
                    base64.b64encode(__import__("zlib").compress(pack("import os\nos.system('x')\n").encode())).decode())
                + ")).decode())\n"]
    for text in variants:
        scan = scan_script(text)
        assert "exec wrapper" in scan.wrapper and scan.inner is not None, text[:80]
        assert any(f.kind == "process" and "system" in f.what for f in scan.findings), scan.findings


def test_triton_and_compressor_subprocess_are_information() -> None:
    scan = scan_script("import subprocess, triton\nsubprocess.run(['lrzip', '-z', 'm.bin'], check=True)\n"
                       "subprocess.run(['nvidia-smi'])\n")
    assert {f.kind for f in scan.findings} == {"info"}
    assert check_observation_of([("lrzip", "execve /usr/bin/lrzip")])[0] == "INFO"


def check_observation_of(processes: list[tuple[str, str]]) -> list[str]:
    from tools.sandbox import Observation
    rows = check_observation(Observation(ran=True, returncode=0, processes=processes, observers=["strace"]))
    return [r.status for r in rows if r.check == "process"]


def test_packed_twin_counts_when_the_log_counts_it(tmp_path: Path) -> None:
    inner = "import torch\n" + "".join(f"v{i} = {i} * 3\n" for i in range(6000))
    packed = pack(inner)
    readable_size = len(inner.encode())
    model = 16_000_000 - len(packed) - 100  # fits with the packed file, not with the readable one
    assert readable_size + model > 16_000_000
    folder = p_folder(tmp_path, seeds=(42,), code=len(packed), model=model)
    (folder / "train_gpt.py").write_text(inner)
    (folder / "train_gpt_packed.py").write_text(packed)
    rows = check(folder)
    size = next(r for r in rows if r.check == "size" and r.seed == "42")
    assert size.status == "PASS" and "packed twin train_gpt_packed.py" in size.value


def test_sibling_exec_stub_fails_on_size(tmp_path: Path) -> None:
    stub = 'exec(open(__file__.replace("train_gpt.py", "train_gpt_inner.py")).read())\n'
    assert len(stub) == 74
    impl = plain_script(80_055 - 74)
    folder = p_folder(tmp_path, seeds=(42,), code=80_055, model=15_978_439)
    (folder / "train_gpt.py").write_text(stub)
    (folder / "train_gpt_inner.py").write_text(impl)
    rows = check(folder)
    size = next(r for r in rows if r.check == "size" and r.seed == "42")
    assert size.status == "FAIL" and "train_gpt_inner.py" in size.value and "16,058,494" in size.value
    assert status(rows, "size (log)", "42") == ["FAIL"]  # the run's own total says so too


def test_coarse_rounding_of_the_score_fails(tmp_path: Path) -> None:
    folder = p_folder(tmp_path, seeds=(42,))
    sub = json.loads((folder / "submission.json").read_text())
    (folder / "submission.json").write_text(json.dumps({**sub, "val_bpb": 1.0, "seed_results": {}}))
    rows = check(folder)
    assert status(rows, "json val_bpb (mean)") == ["FAIL"]


# --- parse_log on the line shapes it used to miss -------------------------------------------------------------------

def test_timestamps_labels_with_attributes_and_text_after_the_bpb() -> None:
    text = ("1776142356.001 1000/20000 train_loss: 2.9 train_time: 1.0m tok/s: 1000\n"
            "1776142356.999 quantized_ttt_phased val_loss:2.31944212 val_bpb:1.05989454 eval_time:508785ms\n")
    p = parse_log(text)
    assert p["final_label"] == "quantized_ttt_phased" and p["final_val_bpb"] == 1.05989454
    assert p["evals"]["quantized_ttt_phased"]["eval_time_ms"] == 508785.0 and p["train"][0]["step"] == 1000
    p = parse_log("final_sliding_window_eval_exact stride:64 val_loss:1.99374987 val_bpb:1.18081285\n")
    ev = p["evals"]["final_sliding_window_eval_exact stride:64"]
    assert ev["name"] == "final_sliding_window_eval_exact" and ev["attrs"] == {"stride": 64}
    assert p["final_val_bpb"] == 1.18081285
    p = parse_log("final_eval val_loss:1.9533 val_bpb:1.1568 (stride=16, T=0.90) eval_time:52345ms\n")
    assert p["final_val_bpb"] == 1.1568 and p["evals"]["final_eval"]["note"] == "(stride=16, T=0.90)"
    assert p["evals"]["final_eval"]["eval_time_ms"] == 52345.0


def test_the_submitted_score_is_not_the_last_line() -> None:
    # the README says no TTT; a later TTT eval diverged. The submission's claim picks the sliding-window line.
    text = ("quantized val_loss:2.0 val_bpb:1.1700 eval_time:9000ms\n"
            "final_sliding_window_exact val_loss:1.95 val_bpb:1.15612345 eval_time:90000ms\n"
            "legal_ttt_exact val_loss:9.1 val_bpb:5.40000000 eval_time:300000ms\n")
    p = parse_log(text)
    assert p["final_label"] == "legal_ttt_exact"  # by position, without a claim
    assert select_final(p, claimed_bpb=1.1561)[0] == "final_sliding_window_exact"
    assert select_final(p, declared="final_sliding_window_exact")[0] == "final_sliding_window_exact"
    # a pre-quantization score is never the submitted one, even when it matches the claim
    p = parse_log("pre-quantization post-ema val_loss:1.9 val_bpb:1.10\nquantized val_loss:2.0 val_bpb:1.12\n")
    assert select_final(p, claimed_bpb=1.10)[0] == "quantized"


# --- hostile scripts: described statically, failed by the sandbox ---------------------------------------------------

def _so_file() -> bytes:
    """Any shared library will do: loading it from the record folder is the violation."""
    dynload = Path(sysconfig.get_config_var("DESTSHARED") or "/nonexistent")
    return min(dynload.glob("*.so"), key=lambda p: p.stat().st_size).read_bytes()


MARSHALLED = marshal.dumps(compile("import os\nos.system('true')\n", "<payload>", "exec"))
HOSTILE = {  # name -> (script, static finding kind, what the sandbox must see)
    "getattr_concat": ("import os\ngetattr(os, 'sys' + 'tem')('true')\n", "process", "process"),
    "builtins_dict": ("b = globals()['__builtins__']\nimp = getattr(b, '__import__', None) or b['__import__']\n"
                      "imp('os').system('true')\n", "dynamic", "process"),
    "sys_modules": ("import sys\nsp = sys.modules.get('subprocess') or __import__('subprocess')\n"
                    "sys.modules['subprocess'].run(['true'])\n", "dynamic", "process"),
    "posix_spawn": ("import os\nos.waitpid(os.posix_spawn('/bin/true', ['true'], dict(os.environ)), 0)\n", "process",
                    "process"),
    "pickle": ("import pickle\npickle.loads(b\"cposix\\nsystem\\n(S'true'\\ntR.\")\n", "dynamic", "code from data"),
    "marshal": (f"import marshal\nexec(marshal.loads({MARSHALLED!r}))\n", "dynamic", "process"),
    "function_type": (f"import marshal, types\ntypes.FunctionType(marshal.loads({MARSHALLED!r}), globals())()\n",
                      "dynamic", "process"),
    "torch_ops": ("import torch\ntorch.ops.load_library('libops.so')\n", "native", "native code"),
    "numpy_datasource": ("import numpy as np\ntry:\n    np.lib.npyio.DataSource().open('http://192.0.2.1/w.txt')\n"
                         "except Exception:\n    pass\n", "network", "network"),
    "tcpstore": ("import datetime\nimport torch.distributed as dist\ntry:\n    dist.TCPStore('192.0.2.1', 29500, 2, "
                 "False, timeout=datetime.timedelta(seconds=1))\nexcept Exception:\n    pass\n", "network", "network"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_script_is_described_statically(name: str) -> None:
    script, kind, _ = HOSTILE[name]
    for text in (script, pack(script)):  # plain and inside the lzma wrapper
        scan = scan_script(text, {"libops.so"})
        assert any(f.kind == kind and f.line > 0 for f in scan.findings), (name, scan.findings)


@needs_sandbox
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_script_fails_in_the_sandbox(name: str) -> None:
    script, _, seen = HOSTILE[name]
    obs = run_sandboxed({"train_gpt.py": pack(script).encode(), "libops.so": _so_file()}, base_env({}), 120)
    if name == "tcpstore" and "strace" not in obs.observers:
        pytest.skip("C++ sockets are seen by strace only (apt-get install strace)")
    rows = check_observation(obs)
    failed = [r for r in rows if r.status == "FAIL"]
    assert any(r.check == seen for r in failed), (name, rows, obs.stderr_tail[-500:])


@needs_sandbox
def test_check_folder_runs_the_script_sandboxed(tmp_path: Path) -> None:
    folder = p_folder(tmp_path, seeds=(42,))
    (folder / "train_gpt.py").write_text(pack(HOSTILE["getattr_concat"][0]))
    (folder / "train_gpt_inner.py").write_text("x = 1\n")
    rows = check_folder(folder, Options(timeout=120))
    assert any(r.check == "process" and r.status == "FAIL" for r in rows)
    assert verdict(rows) == "FAIL"
    # a stub that execs a sibling computed at run time: the sandbox sees the read, the size counts it
    (folder / "train_gpt.py").write_text("import os\nexec(open(os.path.join(os.path.dirname(__file__), "
                                         "'train_gpt_' + 'inner.py')).read())\n")
    rows = check_folder(folder, Options(timeout=120))
    assert "train_gpt_inner.py" in next(r.value for r in rows if r.check == "size")


def test_sandbox_absent_means_not_run(monkeypatch) -> None:
    import tools.sandbox as sb
    monkeypatch.setattr(sb, "sandbox_status", lambda: "bubblewrap is not installed (apt-get install bubblewrap)")
    obs = sb.run_sandboxed({"train_gpt.py": b"raise SystemExit('must never run')\n"}, sb.base_env({}), 10)
    assert not obs.ran and "bubblewrap" in obs.reason
    rows = check_observation(obs)
    assert [(r.check, r.status) for r in rows] == [("sandbox run", "WARN")]



def test_scan_under_another_interpreter_speaks_json() -> None:
    # what runs when the running Python cannot parse a script and a newer python3.X can: same scan, as JSON
    import sys

    from tools.script_scan import _scan_elsewhere
    res = _scan_elsewhere(sys.executable, "import os\nos.system('x')\n")
    assert res is not None and res["parsed_with"].startswith("ast")
    assert any(f["kind"] == "process" and f["line"] == 2 for f in res["findings"])


def test_parse_log_cli_final_label(tmp_path: Path) -> None:
    import subprocess
    import sys
    log = tmp_path / "x.log"
    log.write_text("final_sliding_window_exact val_loss:1.95 val_bpb:1.15612345\nlegal_ttt val_loss:9.1 val_bpb:5.4\n")
    cli = [sys.executable, str(Path(__file__).resolve().parent.parent / "tools" / "parse_log.py"), str(log)]
    row = json.loads(subprocess.run([*cli, "--final", "final_sliding_window_exact"], capture_output=True,
                                    text=True, check=True).stdout)
    assert row["final_label"] == "final_sliding_window_exact" and row["final_val_bpb"] == 1.15612345
    assert json.loads(subprocess.run(cli, capture_output=True, text=True, check=True).stdout)["final_val_bpb"] == 5.4


def test_tokenizer_hash_must_match_across_seeds_json_and_manifest(tmp_path: Path) -> None:
    a, b = "a" * 64, "b" * 64
    folder = p_folder(tmp_path, seeds=(42, 314))
    for seed in (42, 314):
        log = folder / f"train_seed{seed}.log"
        log.write_text(log.read_text().replace("train_shards: 128\n", f"train_shards: 128\ntokenizer: sha256:{a} "
                                               "vocab:8192\n"))
    rows = check(folder)
    assert [r.status for r in rows if r.check == "tokenizer"] == ["INFO"]
    sub = json.loads((folder / "submission.json").read_text())
    (folder / "submission.json").write_text(json.dumps({**sub, "tokenizer_sha256": b}))
    assert [r.status for r in check(folder) if r.check == "tokenizer"] == ["FAIL"]  # not the one the JSON names
    (folder / "submission.json").write_text(json.dumps({**sub, "tokenizer_sha256": a}))
    dataset = write(tmp_path / "ds", {"manifest.json": json.dumps({"tokenizer_sha256": b})})
    rows = check_folder(folder, Options(run=False, dataset=dataset))
    assert [r.status for r in rows if r.check == "tokenizer"] == ["PASS", "FAIL"]  # JSON agrees, manifest does not
    log = folder / "train_seed314.log"  # same vocab size, another tokenizer
    log.write_text(log.read_text().replace(f"sha256:{a}", f"sha256:{b}"))
    assert "FAIL" in [r.status for r in check(folder) if r.check == "tokenizer"]


# --- false alarms seen on the upstream folders (issue 12 follow-up) ---------------------------------------------------

def test_vars_of_an_object_is_not_the_module_namespace() -> None:
    # upstream prints its hyperparameters with vars(type(h)); only vars() with no argument is the module namespace
    quiet = scan_script("class H:\n    lr = 0.1\nh = H()\nfor k, v in vars(type(h)).items():\n    print(k, v)\n"
                        "print(sorted(vars(h)))\n")
    assert quiet.findings == [], quiet.findings
    loud = scan_script("import os\nvars()['x'] = 1\nf = vars(os)['sys' + 'tem']\n")
    assert {f.line for f in loud.findings if f.kind == "dynamic"} == {2, 3}, loud.findings
    assert any("vars(os)" in f.what for f in loud.findings)


PEP701 = ('import torch\nimport torch.distributed as dist\nmodel = torch.nn.Linear(2, 2)\nmodel.eval()\n'
          'model = torch.compile(model)\ndist.init_process_group(backend="nccl")\nx = {"a": 1}\n'
          'print(f"{x["a"]}")\nprint(sorted(vars(model)))\n')


def test_token_fallback_skips_attribute_names() -> None:
    # the fallback for a script this Python cannot parse (PEP 701): `model.eval()` is a method, not the builtin
    from tools.script_scan import _token_scan
    assert _token_scan(PEP701, set()) == []
    found = _token_scan(PEP701 + "eval(input())\ng = vars()\n", set())
    assert [(f.line, f.what) for f in found] == [(10, "token `eval`"), (11, "token `vars`")]


def test_exec_stub_is_named_and_each_fact_reported_once() -> None:
    stub = 'exec(open(__file__.replace("train_gpt.py", "train_gpt_decode.py")).read())\n'
    scan = scan_script(stub, {"train_gpt_decode.py"})
    assert scan.wrapper == "exec stub of train_gpt_decode.py (the code that runs is that file)"
    assert not any("does not decode" in f.what for f in scan.findings)
    reads = [f for f in scan.findings if f.kind == "code_file"]
    assert [f.what.split(" (")[0] for f in reads] == ["reads train_gpt_decode.py"], scan.findings  # not train_gpt.py
    assert [f.what for f in scan.findings if f.kind == "dynamic"] == ["uses exec"]
    assert scan.code_refs == ["train_gpt_decode.py"]


def test_script_row_says_bytes_once() -> None:
    from tools.record_checks import check_script
    plain = check_script(scan_script("x = 1\n"), 6)[0].value
    assert plain.startswith("plain, 6 bytes, parsed by ast") and "bytes bytes" not in plain
    packed = pack("x = 1\n" * 50)
    wrapped = check_script(scan_script(packed), len(packed))[0].value
    assert f"{len(packed):,} bytes -> 300 bytes decoded, parsed by" in wrapped, wrapped


def _scored_folder(root: Path, bpbs: dict[int, float], sub: dict, models: dict[int, int] | None = None) -> Path:
    logs = {f"train_seed{s}.log": record_log(s, {"quantized_sliding_window": b}, model=(models or {}).get(s, 15975300))
            for s, b in bpbs.items()}
    return write(root, {**logs, "submission.json": json.dumps({"track": "10min_16mb", **sub}),
                        "train_gpt.py": plain_script(16630)})


def test_mean_of_rounded_per_seed_claims_is_accepted(tmp_path: Path) -> None:
    # the author rounds each seed to 5 decimals and averages those: 1.08595, where the logs' mean is 1.0859566
    bpbs = {1: 1.0862533, 2: 1.08560205, 3: 1.08601449}
    per_seed = {str(s): {"val_bpb": round(b, 5)} for s, b in bpbs.items()}
    rows = check(_scored_folder(tmp_path / "a", bpbs, {"val_bpb": 1.08595, "seed_results": per_seed}))
    assert status(rows, "json val_bpb (mean)") == ["PASS"]
    assert "mean of the per-seed claims" in next(r.value for r in rows if r.check == "json val_bpb (mean)")
    # no per-seed claims: within one unit of the last printed digit of the logs' mean is accepted too
    rows = check(_scored_folder(tmp_path / "b", bpbs, {"val_bpb": 1.08595}))
    assert status(rows, "json val_bpb (mean)") == ["PASS"]
    # two units off (a worse claim) is still a metadata defect
    rows = check(_scored_folder(tmp_path / "c", bpbs, {"val_bpb": 1.08598, "seed_results": per_seed}))
    assert status(rows, "json val_bpb (mean)") == ["WARN"]


def test_bytes_total_as_the_mean_is_information_and_every_seed_is_still_sized(tmp_path: Path) -> None:
    models = {1: 15_980_000, 2: 15_985_000}  # + 16,630 code: 15,996,630 and 16,001,630 (over the cap)
    totals = [m + 16630 for m in models.values()]
    sub = {"val_bpb": 1.1, "bytes_total": sum(totals) // 2}
    rows = check(_scored_folder(tmp_path / "a", {1: 1.1, 2: 1.1}, sub, models))
    assert status(rows, "json bytes_total") == ["INFO"]
    assert status(rows, "size", "1") == ["PASS"] and status(rows, "size", "2") == ["FAIL"]
    rows = check(_scored_folder(tmp_path / "b", {1: 1.1, 2: 1.1}, {**sub, "bytes_total": totals[0] - 1000}, models))
    assert status(rows, "json bytes_total") == ["WARN"]  # neither the max nor the mean


def test_a_single_train_gpt_variant_is_judged_and_a_missing_script_fails(tmp_path: Path, capsys) -> None:
    from tools import check_record
    folder = p_folder(tmp_path, seeds=(42,))
    script = (folder / "train_gpt.py").read_text()
    (folder / "train_gpt.py").unlink()
    (folder / "train_gpt_v5.py").write_text(script)  # upstream folders ship train_gpt_v5.py and the like
    rows = check(folder)
    assert status(rows, "script name") == ["WARN"] and "train_gpt_v5.py" in next(
        r.value for r in rows if r.check == "script name")
    assert "lzma" in next(r.value for r in rows if r.check == "script")  # the variant was scanned
    size = next(r for r in rows if r.check == "size" and r.seed == "42")
    assert size.status == "PASS" and size.value.startswith(f"{len(script.encode()):,} code")
    assert not [r for r in rows if r.status == "FAIL"]
    (folder / "train_gpt_v6.py").write_text(script)  # two candidates: neither is guessed
    rows = check(folder)
    assert [r.value for r in rows if r.status == "FAIL"] == [
        "required file missing: train_gpt.py (2 candidates: train_gpt_v5.py, train_gpt_v6.py; none judged)"]
    # no script at all (and, upstream, sometimes no log either): FAIL rows and exit 1, never exit 2
    bare = write(tmp_path / "records/track_non_record_16mb/2026-03-19_bare",
                 {"submission.json": json.dumps({"val_bpb": 1.3281, "bytes_total": 15327112})})
    rows = check(bare)
    failed = [r.value for r in rows if r.status == "FAIL"]
    assert "required file missing: train_gpt.py" in failed and verdict(rows) == "FAIL"
    assert check_record.main([str(bare), "--no-run"]) == 1 and capsys.readouterr().err == ""


def _run_row(obs) -> tuple[Row, list[Row]]:
    rows = check_observation(obs)
    return next(r for r in rows if r.check == "sandbox run"), [r for r in rows if r.check == "sandbox verdict"]


def test_an_early_python_error_decides_nothing() -> None:
    from tools.sandbox import Observation
    early = Observation(ran=True, returncode=1, seconds=0.2, observers=["audit hook"], script_ran=False,
                        exit_cause="SyntaxError: f-string: expecting '}' (<string>, line 1078)")
    row, verdict_rows = _run_row(early)
    assert row.status == "WARN" and "SyntaxError" in row.value and "decided nothing" in row.value
    assert "CUDA" not in row.value and verdict_rows == []  # no PASS for a run that did nothing
    late = Observation(ran=True, returncode=1, seconds=8.3, observers=["audit hook"], script_ran=True,
                       exit_cause="RuntimeError: CUDA is required (train_gpt.py line 753, in main)")
    row, verdict_rows = _run_row(late)
    assert row.status == "INFO" and "RuntimeError: CUDA is required" in row.value
    assert [r.status for r in verdict_rows] == ["PASS"]
    silent = Observation(ran=True, returncode=3, seconds=0.1, observers=["audit hook"])  # os._exit: no exception
    assert _run_row(silent)[0].status == "WARN" and _run_row(silent)[1] == []


@needs_sandbox
@pytest.mark.parametrize("script, cause, ran", [
    ("def f(:\n    pass\n", "SyntaxError", False),
    ("import flash_attn_interface_not_installed\n", "ModuleNotFoundError", False),
    ("def main():\n    raise RuntimeError('CUDA is required')\n\nmain()\n", "RuntimeError: CUDA is required", True),
])
def test_the_sandbox_reports_why_the_script_stopped(script: str, cause: str, ran: bool) -> None:
    for text in (script, pack(script)) if "def f(:" not in script else (script,):
        obs = run_sandboxed({"train_gpt.py": text.encode()}, base_env({}), 120)
        assert obs.returncode == 1 and obs.exit_cause.startswith(cause) and obs.script_ran is ran, (
            obs.exit_cause, obs.stderr_tail[-400:])
        assert _run_row(obs)[0].status == ("INFO" if ran else "WARN")


@needs_sandbox
def test_a_train_gpt_variant_is_the_script_the_sandbox_runs(tmp_path: Path) -> None:
    folder = p_folder(tmp_path, seeds=(42,))
    (folder / "train_gpt.py").unlink()
    (folder / "train_gpt_v5.py").write_text("import os\nos.system('true')\n")
    rows = check_folder(folder, Options(timeout=120))
    assert any(r.check == "process" and r.status == "FAIL" for r in rows), rows


def test_newer_pythons_are_probed(tmp_path: Path, monkeypatch) -> None:
    # a pyenv shim named python3.X that cannot run, or that is really another version, is not a newer grammar
    import os
    import sys

    from tools import script_scan
    minor = sys.version_info[1]
    fakes = {f"python3.{minor + 1}": "echo 'pyenv: python3.X: command not found' >&2; exit 127",
             f"python3.{minor + 2}": f'exec {sys.executable} "$@"',
             f"python3.{minor + 3}": f"echo 3.{minor + 3}"}
    for name, body in fakes.items():
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    script_scan.newer_pythons.cache_clear()
    try:
        assert script_scan.newer_pythons() == [str(tmp_path / f"python3.{minor + 3}")]
    finally:
        monkeypatch.setenv("PATH", os.environ["PATH"])
        script_scan.newer_pythons.cache_clear()


NEWER = __import__("tools.script_scan", fromlist=["x"]).newer_pythons()


@needs_sandbox
@pytest.mark.skipif(not NEWER, reason="no newer python3.X on PATH")
def test_a_script_that_needs_newer_grammar_runs_under_it(tmp_path: Path) -> None:
    folder = p_folder(tmp_path, seeds=(42,))
    (folder / "train_gpt.py").write_text('x = {"a": 1}\nprint(f"{x["a"]}")\nraise SystemExit(f"{x["a"]}")\n')
    rows = check_folder(folder, Options(timeout=120))
    run = next(r for r in rows if r.check == "sandbox run")
    assert "SyntaxError" not in run.value and "SystemExit: 1" in run.value, run.value


def test_an_interpreter_under_tmp_is_bound_into_the_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sandbox empties /tmp; a CI clone's venv living there must be bound back, after the tmpfs, or bwrap cannot
    exec the interpreter (every sandboxed run then fails with 'execvp ... No such file or directory')."""
    from tools import sandbox
    venv = tmp_path / "venv"
    venv.mkdir()
    monkeypatch.setattr(sandbox, "_allowed_roots", lambda python=None: [str(venv), "/usr/lib"])
    cmd = sandbox.command(tmp_path / "work", tmp_path / "work" / "rec", "train_gpt.py", 3, None)
    tmpfs = cmd.index("--tmpfs")
    binds = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--ro-bind" and i > tmpfs]
    assert str(venv) in binds and "/usr/lib" not in binds  # only what the empty /tmp hides


def test_sys_modules_of_this_module_is_not_dynamic() -> None:
    """A packed experiment binds `train_gpt = sys.modules[__name__]` (the file itself): no finding; a computed or a
    risky module key still is one."""
    kinds = lambda src: [f.kind for f in scan_script(src, set()).findings]
    assert "dynamic" not in kinds("import sys\ntrain_gpt = sys.modules[__name__]\n")
    assert "dynamic" in kinds("import sys\nname = 'x'\nm = sys.modules[name]\n")
    assert "dynamic" in kinds("import sys\nsys.modules['subprocess'].run(['true'])\n")
