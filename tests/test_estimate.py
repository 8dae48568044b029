"""tools/estimate.py and its libraries: parameters counted on the real model, traced work (record N's model features
included), the fusion model, the roofline calibration on record P and its validation on B and N, the command line."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train_gpt
from tools import artifact_size, planner
from tools import workcount as wc
from tools.envfile import read_env_file

ROOT = Path(__file__).resolve().parent.parent
P = planner.record_p().cfg
N = planner.record_n().cfg
MATRICES = 11 * 2_883_584 + 8192 * 512  # block matrices + tied head (P and N)


def test_params_counted_on_the_real_model() -> None:
    counts = artifact_size.count_params(P)
    assert counts["total"] == 35_944_536  # record P
    assert counts["attention"] + counts["mlp"] == 11 * 2_883_584 and counts["embedding"] == 4_194_304
    tiny = train_gpt.Config.from_env({"NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                                      "ROPE_DIMS": "8", "NUM_LOOPS": "0", "XSA_LAST_N": "1"})
    assert artifact_size.count_params(tiny)["total"] == sum(p.numel() for p in train_gpt.GPT(tiny).parameters())
    assert artifact_size.count_params(planner.record_b().cfg)["total"] == 17_059_912  # the baseline's model_params
    assert artifact_size.count_params(N)["total"] == 35_945_671  # record N: P + gates and lane lambdas


def test_record_profiles_come_from_the_env_files() -> None:
    assert P == train_gpt.Config.from_env(read_env_file(planner.P_ENV_FILE))
    assert (P.parallel_lanes, P.smear_gate_enabled, P.sparse_attn_gate_enabled, P.doc_isolation) == (1, False, False,
                                                                                                   False)
    n = planner.record_n()
    assert n.cfg == dataclasses.replace(train_gpt.Config.from_env(read_env_file(planner.N_ENV_FILE)),
                                        gptq_reserve_seconds=0.5)  # the logged seeds' reserve
    assert (N.parallel_lanes, N.smear_gate_enabled, N.sparse_attn_gate_enabled, N.doc_isolation) == (2, True, True, True)
    assert n.features == {"fused_ce", "fused_mlp", "banks", "batch_rows", "ttt_queue"}  # only what pgolf's code lacks
    b = planner.record_b().cfg  # the baseline has none of N's features, whatever the defaults are
    assert (b.parallel_lanes, b.smear_gate_enabled, b.sparse_attn_gate_enabled, b.doc_isolation) == (1, False, False,
                                                                                                   False)
    with pytest.raises(ValueError, match="unknown code features.*two_lane"):
        dataclasses.replace(n, features=n.features | {"two_lane"})
    caseops = planner.custom_profile(train_gpt.Config.from_env(read_env_file(planner.N_ENV_FILE)))
    assert caseops.features == frozenset() and caseops.val_tokens == planner.DOC_LENGTH_TOKENS
    assert planner.custom_profile(P).val_tokens == planner.record_p().val_tokens


def test_size_calibration_point_and_variants() -> None:
    p = artifact_size.predict_bytes(P)
    assert p["model_bytes"] == pytest.approx(15_975_300, abs=1) and p["limit_bytes"] == train_gpt.ARTIFACT_LIMIT_BYTES
    assert not artifact_size.predict_bytes(dataclasses.replace(P, num_layers=12))["fits"]
    assert artifact_size.predict_bytes(dataclasses.replace(P, matrix_bits=5))["model_bytes"] < p["model_bytes"] - 1e6


def test_trace_matches_flop_counter_and_hand_count() -> None:
    w = wc.trace_train_step(P, 2, looping=False)
    assert w.total("matmul") == pytest.approx(w.flop_counter_total)  # torch's FlopCounterMode sees the same matmuls
    tokens = 2 * P.train_seq_len
    assert w.total("matmul") == pytest.approx(6 * MATRICES * tokens, rel=1e-6)
    # causal attention: 4*B*H*D*T(T+1)/2 forward, 2.5x that backward, on 11 layers
    fwd = 4 * 2 * 8 * 64 * 2048 * 2049 / 2
    assert w.total("attention") == pytest.approx(11 * 3.5 * fwd)


def test_record_n_model_is_traced_from_the_real_code() -> None:
    """N's model runs in the trace: the sparse gate (12 dims -> 8 heads per layer) and SmearGate (12 -> 1, on T-1
    positions) are matmuls; document-isolated attention takes the document shape, dense attention never does."""
    docs = wc.AttentionShape(pairs_per_token=500.0, segment_len=1000)
    w = wc.trace_train_step(N, 2, looping=False, attn=docs)
    T = N.train_seq_len
    assert w.total("matmul") == pytest.approx(w.flop_counter_total)
    assert w.total("matmul") == pytest.approx(6 * 2 * T * (MATRICES + 11 * 8 * 12) + 6 * 2 * (T - 1) * 12, rel=1e-9)
    assert w.total("attention") == pytest.approx(11 * 3.5 * 4 * 2 * 8 * 64 * T * 500.0)
    assert {o.seq for o in w.ops if o.family == "attention"} == {1000}
    dense = wc.trace_train_step(dataclasses.replace(N, doc_isolation=False), 2, looping=False, attn=docs)
    assert dense.total("attention") == pytest.approx(11 * 3.5 * 4 * 2 * 8 * 64 * T * (T + 1) / 2)
    # each feature's elementwise work is in the trace: switching one off removes kernels and bytes
    other = w.total("other", "eager_bytes")
    for field, off in (("parallel_lanes", 1), ("smear_gate_enabled", False), ("sparse_attn_gate_enabled", False)):
        less = wc.trace_train_step(dataclasses.replace(N, **{field: off}), 2, looping=False, attn=docs)
        assert less.count("other") < w.count("other") and less.total("other", "eager_bytes") < other, field
    # eval scoring runs under no_grad with N's lane lambdas passed into every Block (FlopCounterMode's module
    # tracker used to fail on those parameter views)
    s = wc.trace_score_batch(N, 2, docs)
    assert s.total("matmul") == pytest.approx(s.flop_counter_total) and s.total("matmul") > 0
    passes = planner.layer_passes(N, True)
    assert s.total("attention") == pytest.approx(passes * 4 * 2 * 8 * 64 * N.eval_seq_len * 500.0)


def test_fusion_model_moves_the_logits_once_each_way() -> None:
    """Fused, the softcap + cross-entropy chain reads the bf16 logits forward, reads them and writes their gradient
    backward: 3 x tokens x vocab x 2 bytes. Eager, it moves several times more."""
    w = wc.trace_train_step(P, 2, looping=True)
    logits = 2 * P.train_seq_len * P.vocab_size * 2
    assert w.total("logits", "bytes") == pytest.approx(3 * logits, rel=0.01)
    assert w.total("logits", "eager_bytes") > 5 * w.total("logits", "bytes")


def test_document_isolated_attention_visits_fewer_pairs_than_dense() -> None:
    # four 1000-token documents in rows of 2048: the row boundary cuts the third one
    segs = wc.packed_segments([1000] * 4, 2048, 2048)
    assert sorted(segs.tolist()) == [48, 952, 1000, 1000, 1000]
    assert sorted(wc.packed_segments([5000], 8192, 2048).tolist()) == [904, 2048, 2048]  # cut every max_len
    assert wc.pairs_per_token([1, 2]) == pytest.approx((1 + 3) / 3)
    pgolf = planner.doc_attention(2048, 2048)  # rows are the sequences
    n_rows = planner.doc_attention(98_304, 2048)  # record N: a rank's micro-batch is one row, cut every 2048
    assert 0 < pgolf.pairs_per_token < n_rows.pairs_per_token < 2049 / 2
    assert pgolf.segment_len <= n_rows.segment_len <= 2048
    assert planner.train_attention(planner.record_n()) == n_rows
    assert planner.train_attention(planner.custom_profile(N)) == pgolf
    assert planner.train_attention(planner.record_p()) == wc.AttentionShape()
    assert planner.doc_lengths().sum() == pytest.approx(planner.DOC_LENGTH_TOKENS + planner.VAL_DOCS)


def test_ring_collectives_scale_with_message_size() -> None:
    one = planner.ring_seconds(1e9, 8)
    assert one == pytest.approx(planner.COLLECTIVE_LATENCY_S + 1e9 * 2 * 7 / 8 / planner.NVLINK_BUS_BYTES_S)
    assert planner.ring_seconds(1e9, 1) == 0.0


def test_record_n_features_change_the_step() -> None:
    n, k = planner.record_n(), planner.default_constants()
    plain = dataclasses.replace(n, features=frozenset())
    assert planner.train_step_cost(n, k, False).seconds < planner.train_step_cost(plain, k, False).seconds
    no_mlp = dataclasses.replace(n, features=n.features - {"fused_mlp"})
    assert planner.train_step_cost(n, k, False).seconds < planner.train_step_cost(no_mlp, k, False).seconds
    pgolf_rows = dataclasses.replace(n, features=n.features - {"batch_rows"})  # shorter segments, less attention
    assert (planner.train_step_cost(pgolf_rows, k, False).parts["fwd_bwd_attention"]
            < planner.train_step_cost(n, k, False).parts["fwd_bwd_attention"])


def test_validation_table_from_one_calibration() -> None:
    rows = {r["record"]: r for r in planner.validation()}
    assert abs(rows["B"]["steps_err"]) < 0.03  # predicted, not fitted
    assert abs(rows["P"]["steps_err"]) < 0.03 and rows["P"]["step_ms_post"] == pytest.approx(151.0, rel=0.03)
    assert abs(rows["P"]["eval_err"]) < 0.15
    assert abs(rows["N"]["steps_err"]) < 0.03  # predicted: N's features traced, not fitted
    assert rows["N"]["step_ms_pre"] == pytest.approx(96.0, rel=0.03)
    assert rows["N"]["step_ms_post"] == pytest.approx(141.0, rel=0.03)
    assert abs(rows["N"]["eval_err"]) < 0.15  # N's phased TTT: its schedule, pgolf's traced TTT step


def test_ttt_step_trace_counts_the_adapters_and_their_optimizer() -> None:
    """The phased TTT's step is traced from evals.phased_ttt.ttt_step: the adapters' thin matmuls (memory-bound:
    they read the full activations for rank-r outputs) and the AdamW step on them are in the work, which a frozen
    model's forward + backward alone would miss."""
    cfg = dataclasses.replace(planner.record_n().cfg, ttt_lora_rank=80)
    w = wc.trace_ttt_step(cfg, 4, 256)
    frozen = wc.trace_train_step(dataclasses.replace(cfg, train_seq_len=256, train_batch_tokens=1024), 4, True,
                                        weight_grads=False)
    passes = planner.layer_passes(cfg, True)
    adapters = w.count("matmul") - frozen.count("matmul")
    assert adapters >= passes * 5 * 4  # 5 adapters per pass: 2 matmuls forward, 2 weight gradients (and most dX)
    assert w.count("optimizer") > 0 and frozen.count("optimizer") == 0
    k = planner.default_constants()
    assert planner.work_seconds(w, k)["matmul"] > 1.3 * planner.work_seconds(frozen, k)["matmul"]


def test_phased_ttt_schedules_record_n_queue_and_pgolf_lanes() -> None:
    """Record N's code (a shared queue, each batch at its own size and window) against pgolf's (static lanes, a
    power of two of rows and of window length): the same documents, more row-tokens and a later end for pgolf; the
    longest batch (N's 16 longest documents) runs at 16 rows in both."""
    n = planner.record_n()
    k = planner.default_constants()
    pg = dataclasses.replace(n, features=n.features - {"ttt_queue"})
    lengths = planner.doc_lengths(n.val_tokens)
    q, s = (planner._batch_schedule(n.phased, lengths, queue) for queue in (True, False))
    assert [len(c) for _, c in q] == [len(c) for _, c in s] and q[0][0] == s[0][0] == 16
    assert sum(r * sum(c) for r, c in s) > 1.15 * sum(r * sum(c) for r, c in q)
    assert planner.phased_ttt_plan(pg, k)["total_s"] > planner.phased_ttt_plan(n, k)["total_s"]


@pytest.mark.slow
def test_stored_constants_are_the_calibration() -> None:
    k = planner.calibrate(**planner.P_CALIBRATION)
    c = planner.CALIBRATED
    assert (k.mm_eff, k.fuse, k.host_op_s, k.eval_slow) == pytest.approx((c.mm_eff, c.fuse, c.host_op_s, c.eval_slow),
                                                                          rel=1e-3)


def test_env_file_goes_through_config_from_env(tmp_path: Path) -> None:
    f = tmp_path / "x.env"
    f.write_text("# comment\nNUM_LAYERS=9\nexport MLP_MULT='2'\n")
    assert planner.read_env_file(f) == {"NUM_LAYERS": "9", "MLP_MULT": "2"}
    from tools.estimate import build_profile

    assert build_profile(None, f).cfg.num_layers == 9
    f.write_text("MODEL_DIMS=3\n")
    with pytest.raises(ValueError, match="MODEL_DIM"):
        build_profile(None, f)
    f.write_text("NUM_LAYERS\n")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        build_profile(None, f)


def _run(args: list[str], extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    fields = {f.name.upper() for f in dataclasses.fields(train_gpt.Config)}
    env = {k: v for k, v in os.environ.items() if k not in fields}
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "tools/estimate.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_cli_plan_and_validate() -> None:
    r = _run(["--json"], {"NUM_LAYERS": "12"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["params"]["total"] > 35_944_536 and not out["bytes"]["fits"] and out["train"]["steps"] > 0
    v = _run(["--validate"])
    assert v.returncode == 0 and "fitted on record P only" in v.stdout
    assert [line.split()[0] for line in v.stdout.splitlines()[2:5]] == ["B", "P", "N"]


def test_cli_errors() -> None:
    bad = _run([], {"MODEL_DIMS": "3"})
    assert bad.returncode == 2 and "did you mean MODEL_DIM" in bad.stderr and "Traceback" not in bad.stderr
    missing = _run(["--env-file", "nope.env"])
    assert missing.returncode == 2 and "no such file" in missing.stderr


def test_gaussian_code_entropy_limits() -> None:
    fine = 0.5 * math.log2(2 * math.pi * math.e) - math.log2(20.0 / 127)
    assert artifact_size.gaussian_code_entropy(8, 20.0) == pytest.approx(fine, abs=0.01)
