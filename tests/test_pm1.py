"""experiments/pm1.py end to end: a tiny strict-±1 run in-process and a ternary one under torchrun with 2 gloo ranks;
the artifact holds exactly the codes the forward used, at about a bit per weight."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_TRAIN

import train_gpt
from experiments import pm1
from quant import load_artifact
from quant.__main__ import inspect

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(ttt_enabled=False, sliding_window_enabled=False)  # the quantized eval is the one compared


def bits_per_weight(path: Path) -> tuple[dict[str, dict[str, str]], dict[str, float]]:
    """inspect's bits_per_weight lines by kind, and each tensor's share bytes from its table."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        inspect(str(path))
    text = out.getvalue()
    kinds = {m["kind"]: m for m in (dict(kv.split(":", 1) for kv in line.split()[1:])
                                    for line in text.splitlines() if line.startswith("bits_per_weight "))}
    shares = {m[1]: float(m[2].replace(",", "")) for m in re.finditer(r"^(\S+)\s+\S+\s+(?:sign|ternary) \S+\s+\S+\s+"
                                                                      r"\S+\s+(\S+)", text, re.M)}
    return kinds, {k: v for k, v in shares.items()}


@pytest.mark.slow
def test_pm1_in_process(tiny_dataset, tmp_path: Path) -> None:
    before = {k: getattr(train_gpt, k) for k in pm1.PATCHES}
    with pm1.installed():
        cfg = pm1.PM1Config(**TINY_TRAIN, **FAST, pm1_embed=True, data_path=str(tiny_dataset.data_dir),
                            tokenizer_path=str(tiny_dataset.tokenizer), out_dir=str(tmp_path), run_id="pm1", seed=7)
        summary = train_gpt.run(cfg, train_gpt.Runtime())
    assert {k: getattr(train_gpt, k) for k in pm1.PATCHES} == before  # installed() restored train_gpt's globals
    ev = summary["evals"]
    assert summary["final_label"] == "quantized" and summary["config"]["pm1_embed"] is True
    # the artifact stores exactly the codes the forward used; only the fp16 passthrough scalars differ
    assert abs(ev["quantized"]["val_bpb"] - ev["pre-quantization post-ema"]["val_bpb"]) < 1e-5
    qts = {qt.name: qt for qt in load_artifact(tmp_path / "final_model.int6.ptz")}
    assert qts["tok_emb.weight"].kind == "sign"
    blocks = [qt for n, qt in qts.items() if n.startswith("blocks.") and qt.kind != "passthrough"]
    assert len(blocks) == 6 * TINY_TRAIN["num_layers"] and {qt.kind for qt in blocks} == {"sign"}
    kinds, shares = bits_per_weight(tmp_path / "final_model.int6.ptz")
    sign = kinds["sign_1-bit"]
    assert int(sign["tensors"]) == len(blocks) + 1 and float(sign["bits"]) <= 1.1
    assert float(sign["h0_bits"]) > 0.95  # trained signs stay close to a fair coin
    for qt in blocks:  # a bit per weight plus the row's fp16 scale (16 bits per 64- or 256-weight row here)
        assert 8 * shares[qt.name] / qt.codes.numel() <= 1.05, qt.name  # one fp16 scale per tensor: no per-row cost
    log = (tmp_path / "logs" / "pm1.txt").read_text()
    assert f"source_file: experiments/pm1.py bytes:{len((ROOT / 'experiments/pm1.py').read_bytes())}" in log
    assert re.search(r"^pm1 blocks:sign embed:sign coded_weights:\d+ float_weights:\d+ coded_tensors:25$", log, re.M)
    assert "sign (1-bit): blocks.attn.c_k.weight" in log
    assert summary["bytes_code"] == sum(len(b) for b in pm1.pm1_code_sources().values())


@pytest.mark.slow
def test_pm1_ternary_torchrun_two_ranks(tiny_dataset, tmp_path: Path) -> None:
    env = {**os.environ, **{k.upper(): str(int(v) if isinstance(v, bool) else v) for k, v in {**TINY_TRAIN, **FAST}.items()},
           "DATA_PATH": str(tiny_dataset.data_dir), "TOKENIZER_PATH": str(tiny_dataset.tokenizer),
           "OUT_DIR": str(tmp_path), "RUN_ID": "ddp", "PM1_TERNARY": "1", "PM1_EMBED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "experiments" / "pm1.py")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    ev = summary["evals"]
    assert summary["world_size"] == 2 and summary["config"]["pm1_ternary"] is True
    assert 0 < summary["final_val_bpb"] < 12
    assert abs(ev["quantized"]["val_bpb"] - ev["pre-quantization post-ema"]["val_bpb"]) < 1e-5
    kinds = {qt.kind for qt in load_artifact(tmp_path / "final_model.int6.ptz") if qt.name.startswith("blocks.")}
    assert kinds == {"ternary", "passthrough"}
    log = (tmp_path / "logs" / "ddp.txt").read_text()
    assert "source_file: experiments/pm1.py bytes:" in log and "pm1 blocks:ternary embed:sign" in log
