"""tools/estimate.py: parameter count vs the real model, size calibration, speed validation on record P, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt
from tools import estimate

ROOT = Path(__file__).resolve().parent.parent

P = estimate.record_p_config()
OTHER_CONFIGS = {
    "9L_mlp2_noloop": {"NUM_LAYERS": "9", "MLP_MULT": "2", "NUM_LOOPS": "0"},
    "tiny_cpu": {"NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "VOCAB_SIZE": "512",
                 "ROPE_DIMS": "8", "NUM_LOOPS": "1", "LOOP_START": "0", "LOOP_END": "1", "XSA_LAST_N": "1",
                 "SKIP_GATES_ENABLED": "0", "TRAIN_SEQ_LEN": "128", "TRAIN_BATCH_TOKENS": "1024",
                 "EVAL_SEQ_LEN": "128", "EVAL_STRIDE": "32", "TTT_CHUNK_TOKENS": "256"},
    "13L_mlp3.5_mha": {"NUM_LAYERS": "13", "MLP_MULT": "3.5", "NUM_KV_HEADS": "8", "LOOP_START": "4", "LOOP_END": "7",
                       "NUM_LOOPS": "1", "PARALLEL_RESIDUAL_START": "9"},
}


def _meta_total(cfg: train_gpt.Config) -> int:
    with torch.device("meta"):
        model = train_gpt.GPT(cfg)
    return sum(p.numel() for p in model.parameters())


def test_record_p_exact_param_count():
    counts = estimate.count_params(P)
    assert counts["total"] == 35_944_536
    # STACK.md §A.1.7: 11 x (2,883,584 matrix + 2,056 scalar) + 4,194,304 embedding + 2 x 8 x 512 skips
    assert counts["attention"] + counts["mlp"] == 11 * 2_883_584
    assert counts["block_control"] == 11 * 2_056
    assert counts["embedding"] == 4_194_304
    assert counts["skip_weights"] == counts["skip_gates"] == 8 * 512
    assert estimate.check_against_model(train_gpt.Config()) == 35_944_536  # trainer defaults are record P


@pytest.mark.parametrize("name", list(OTHER_CONFIGS))
def test_analytic_count_matches_meta_model(name):
    cfg = train_gpt.Config.from_env(OTHER_CONFIGS[name])
    total = estimate.count_params(cfg)["total"]
    assert total == _meta_total(cfg)
    assert estimate.check_against_model(cfg) == total


def test_model_mismatch_is_detected(monkeypatch):
    real = estimate.param_inventory
    monkeypatch.setattr(estimate, "param_inventory", lambda cfg: real(cfg)[:-1])
    with pytest.raises(AssertionError, match="out of sync"):
        estimate.check_against_model(P)


def test_flops_per_token_by_hand():
    # per pass: 2 x 2,883,584 matmul + 4 x 512 x 1024 attention; head 2 x 8192 x 512
    per_pass = 2 * 2_883_584 + 4 * 512 * 1024
    assert estimate.forward_flops(P, False, 2048)["total"] == 11 * per_pass + 2 * 8192 * 512
    assert estimate.forward_flops(P, True, 2048)["total"] == 17 * per_pass + 2 * 8192 * 512
    assert estimate.flops_per_token(P, True) == 3 * (17 * per_pass + 2 * 8192 * 512)


def test_speed_validation_from_preloop_calibration_only():
    mfu = estimate.calibrate_mfu()
    tr = estimate.train_plan(P, mfu, 8, estimate.H100_SXM_PEAK_TFLOPS)
    assert tr["step_s_preloop"] == pytest.approx(786_432 / 7.70e6, rel=1e-9)  # the calibration point itself
    assert abs(tr["step_s_postloop"] / 0.151 - 1) < 0.10  # measured ~151 ms, not an input
    assert abs(tr["steps"] / 4550 - 1) < 0.10  # measured 4,550 steps in 588 s, not an input
    assert tr["budget_s"] == 588.0 and tr["seconds_preloop"] == pytest.approx(0.35 * 588)
    # fewer GPUs, same global batch: 8x longer steps, 8x fewer steps
    tr1 = estimate.train_plan(P, mfu, 1, estimate.H100_SXM_PEAK_TFLOPS)
    assert tr1["steps"] == pytest.approx(tr["steps"] / 8)


def test_size_prediction():
    # P's config is the calibration point of the one size constant, so this checks the solve, not a prediction
    p = estimate.predict_bytes(P)
    assert abs(p["model_bytes"] / 15_975_300 - 1) < 0.01
    assert p["fits"] and p["total_bytes"] == pytest.approx(15_975_300 + estimate.DEFAULT_CODE_BYTES)
    big = estimate.predict_bytes(dataclasses.replace(P, num_layers=12))
    assert not big["fits"] and big["total_bytes"] > 16_000_000
    small = estimate.predict_bytes(dataclasses.replace(P, matrix_bits=5))
    assert small["model_bytes"] < p["model_bytes"] - 1_000_000
    assert 0 < estimate.size_calibration()["delta_bits"] < 0.5  # brotli overhead over the entropy is small


def test_gaussian_code_entropy_limits():
    # fine steps: differential entropy of N(0,1) minus log2(step)
    fine = 0.5 * math.log2(2 * math.pi * math.e) - math.log2(20.0 / 127)
    assert estimate.gaussian_code_entropy(8, 20.0) == pytest.approx(fine, abs=0.01)
    assert estimate.gaussian_code_entropy(2, 3.0) <= math.log2(3)


def test_eval_counts_for_record_p():
    ev = estimate.eval_plan(P, estimate.calibrate_mfu(), 8, estimate.H100_SXM_PEAK_TFLOPS)
    assert ev["windows"] == 633_409 and ev["ttt_chunks"] == 1_238  # STACK.md §D.2/§D.3
    assert ev["ttt_adapt_tokens"] == 1_237 * 32_768
    assert ev["total_s"] == pytest.approx(ev["sliding_s"] + ev["ttt_s"])


def test_plan_tiny_config():
    r = estimate.plan(train_gpt.Config.from_env(OTHER_CONFIGS["tiny_cpu"]))
    assert r["params"]["skip_gates"] == 0 and r["train"]["steps"] > 0 and r["bytes"]["fits"]
    assert r["config_vs_record_p"]["num_layers"] == 2


def _run(args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    fields = {f.name.upper() for f in dataclasses.fields(train_gpt.Config)}
    env = {k: v for k, v in os.environ.items() if k not in fields}
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "tools/estimate.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_record_p():
    r = _run([])
    assert r.returncode == 0, r.stderr
    for key in ("35,944,536", "15,975,300", "FITS", "post-loop step", "total steps 45", "sliding window: 633,409",
                "TTT:", "of 600 s"):
        assert key in r.stdout, key


def test_cli_variant_json_and_errors():
    r = _run(["--json"], {"NUM_LAYERS": "12"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["config_vs_record_p"] == {"num_layers": 12} and not out["bytes"]["fits"]
    bad = _run([], {"MODEL_DIMS": "3"})
    assert bad.returncode == 2 and "did you mean MODEL_DIM" in bad.stderr and "Traceback" not in bad.stderr
