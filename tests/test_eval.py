"""train_gpt's evaluation (plain, sliding) and record N's phased TTT under tools/check_legality.py: coverage, and the
legality checker passing the real eval paths while catching illegal variants built from the same blocks."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAIN
from torch import Tensor

import train_gpt
from data import shards
from data.shards import BOS_ID, write_shard
from evals import phased_ttt
from quant import encode_artifact, quantize_state_dict, save_artifact
from tools import legality as cl
from train_gpt import GPT, Config

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def EV(luts: tuple, batch_windows: int) -> train_gpt.EvalContext:  # noqa: N802
    return train_gpt.EvalContext(luts, batch_windows)
L, S = 32, 8  # window, stride
N = 160  # targets
TINY = {**TINY_TRAIN, **dict(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, loop_start=0, loop_end=0,  # smaller
                             xsa_last_n=2, parallel_residual_start=1, train_seq_len=L, eval_seq_len=L, eval_stride=S,
                             ttt_chunk_size=8, ttt_eval_seq_len=24, ttt_batch_size=2, ttt_lanes=2, ttt_lora_rank=4,
                             ttt_lora_lr=0.01, phased_ttt_prefix_docs=4, phased_ttt_num_phases=2,
                             global_ttt_chunk_tokens=64, global_ttt_lr=0.01, compressor="zstd")}
DOC_LENGTHS = [23, 41, 17, 60, 30, 9, 45, 35, 12, 50]  # the TTT stream: 10 documents, 5 batches of 2, 3 rounds


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny ops on 2 shared cores: a second OpenMP thread stuck behind a busy core makes each op ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tiny_dataset) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """The first N+1 val tokens and the tokenizer's byte LUTs."""
    val = shards.load_val_tokens(str(tiny_dataset.data_dir / shards.VAL_GLOB), L, tiny_dataset.vocab_size)
    sp = shards.load_tokenizer(tiny_dataset.tokenizer, tiny_dataset.vocab_size)
    return val[: N + 1], shards.build_byte_luts(sp, tiny_dataset.vocab_size)


@pytest.fixture(scope="module")
def docs_stream(data) -> Tensor:
    """Val tokens re-cut into DOC_LENGTHS documents: a BOS at each start (and none elsewhere); the last one runs to
    the end of the stream, so it has length - 1 targets like the others."""
    val, _ = data
    n = sum(DOC_LENGTHS)
    tokens = torch.cat((val, val))[: n].clone()
    tokens[tokens == BOS_ID] = BOS_ID + 1
    starts = np.cumsum([0, *DOC_LENGTHS[:-1]])
    tokens[starts] = BOS_ID
    return tokens


def tiny_model(cfg: Config, seed: int = 0) -> GPT:
    """A random model in eval mode, looping on like a loaded artifact. Every weight gets noise: the zero-initialized
    output projections would otherwise switch attention off and make any context leak invisible."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.looping = True
    return model.eval()


@pytest.fixture(scope="module")
def cfg() -> Config:
    return Config(**TINY)


@pytest.fixture(scope="module")
def model(cfg: Config) -> GPT:
    return tiny_model(cfg)


def run_score(logits_fn, tokens: Tensor, starts: np.ndarray, stride: int, luts) -> tuple[Tensor, Tensor, Tensor]:
    n = tokens.numel() - 1
    nll, hits = torch.full((n,), float("nan"), dtype=torch.float64), torch.zeros(n, dtype=torch.int64)
    sums = train_gpt.score_windows(logits_fn, tokens, starts, L, stride, EV(luts, 64), nll, hits)
    return sums, nll, hits


# --- window_starts / score_windows / evaluate ------------------------------------------------------------------------

def test_stride_equal_to_window_is_the_plain_eval(model: GPT, data) -> None:
    tokens, luts = data
    starts = train_gpt.window_starts(N, L, L)
    assert starts.tolist() == list(range(0, N, L))
    sums, _, hits = run_score(model.forward_logits, tokens, starts, L, luts)
    # independent: non-overlapping sequences, float64 log-softmax, bytes straight from the LUT definition
    x, y = tokens[:N].view(-1, L), tokens[1 : N + 1].view(-1, L)
    with torch.no_grad():
        logp = model.forward_logits(x).double().log_softmax(-1)
    nll = -logp.gather(-1, y[..., None]).sum()
    base, leading_space, boundary = luts
    nbytes = int((base[y].long() + (leading_space[y] & ~boundary[x]).long()).sum())
    assert int(sums[1]) == N and hits.eq(1).all()
    assert int(sums[2]) == nbytes
    assert float(sums[0]) == pytest.approx(float(nll), rel=1e-6)
    loss, bpb = train_gpt.evaluate(model.forward_logits, tokens, L, L, EV(luts, 4))
    assert loss == pytest.approx(float(nll) / N, rel=1e-6)
    assert bpb == pytest.approx(float(nll) / math.log(2) / nbytes, rel=1e-6)


def test_byte_sidecar_replaces_the_luts(model: GPT, data) -> None:
    """A transformed tokenizer's val bytes come from the sidecar: target i (the token at stream position i) counts
    val_bytes[i], in plain and sliding scoring alike; the loss is untouched."""
    tokens, luts = data
    val_bytes = torch.randint(0, 5, (tokens.numel(),))
    for stride in (L, L // 2):
        starts = train_gpt.window_starts(N, L, stride)
        plain = train_gpt.score_windows(model.forward_logits, tokens, starts, L, stride, EV(luts, 64))
        side = train_gpt.score_windows(model.forward_logits, tokens, starts, L, stride,
                                       train_gpt.EvalContext(luts, 64, val_bytes=val_bytes))
        assert int(side[2]) == int(val_bytes[1 : N + 1].sum()) and float(side[0]) == float(plain[0])


def test_val_bytes_must_pair_with_the_val_shards(tmp_path: Path) -> None:
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(10, dtype=np.uint16))
    assert shards.load_val_bytes(tmp_path, 9) is None  # a plain dataset: the LUTs count
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.full(10, 2, dtype=np.uint16))
    assert shards.load_val_bytes(tmp_path, 9).tolist() == [2] * 9  # cut like the val tokens
    assert shards.shard_files(str(tmp_path / shards.VAL_GLOB)) == [str(tmp_path / "fineweb_val_000000.bin")]
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.full(11, 2, dtype=np.uint16))
    with pytest.raises(shards.ShardError, match="do not pair"):
        shards.load_val_bytes(tmp_path, 9)


@pytest.mark.parametrize("n", [N, N - 3])  # the second: a stream whose end is not on a stride boundary
def test_sliding_scores_each_target_once_first_window_all_later_their_tail(model: GPT, data, n: int) -> None:
    tokens, luts = data
    tokens = tokens[: n + 1]
    starts = train_gpt.window_starts(n, L, S)
    _, _, hits = run_score(model.forward_logits, tokens, starts, S, luts)
    assert hits.eq(1).all() and hits.numel() == n
    for i, s in enumerate(starts.tolist()):
        _, _, h = run_score(model.forward_logits, tokens, np.array([s]), S, luts)
        lo = 0 if i == 0 else s + L - S
        want = torch.zeros(n, dtype=torch.int64)
        want[lo : min(s + L, n)] = 1
        assert torch.equal(h, want), f"window {i} at {s} scored {torch.nonzero(h).flatten().tolist()}"


# --- the checker on the real eval paths --------------------------------------------------------------------------------

def cuts_for(mode: str) -> list[tuple[str, int]]:
    return cl.default_cuts(N, L, S)


def assert_all_pass(rows: list[cl.Row]) -> None:
    assert rows and all(r.ok for r in rows), cl.format_table(rows)


def test_checker_passes_real_sliding(cfg: Config, model: GPT, data) -> None:
    tokens, luts = data
    sliding = cl.SlidingEval(model, cfg, luts, 4)
    rows = cl.check_eval(sliding, tokens, cuts_for("sliding"), cfg.vocab_size, "sliding", 0, sliding.probe)
    assert_all_pass(rows)
    assert {r.check for r in rows} == {"C1 causality", "C2 normalized", "C4 single pass"}
    assert len(rows) == 2 + len(cuts_for("sliding")) >= 5


def ttt_eval(cfg: Config, model: GPT, luts) -> cl.PhasedTTTEval:
    return cl.PhasedTTTEval(lambda: copy.deepcopy(model), cfg, luts)


def test_ttt_cuts_cover_the_schedule(cfg: Config, docs_stream: Tensor) -> None:
    plan = phased_ttt.make_plan(docs_stream, cfg.ttt_batch_size, cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases)
    assert [len(b) for b in plan.queue] == [2] * 5 and plan.boundaries == [2, 4]
    cuts = dict(cl.ttt_cuts(docs_stream, cfg))
    first = plan.docs[plan.queue[0][0]][1] - 1  # slot 0 of the first batch: the longest document but one
    assert cuts["first step, mid-chunk"] == min(8, first) // 2 + 1
    # targets of documents 9 and 3 (batch 0), 1 and 6 (batch 1); the last document has no BOS after it
    assert cuts["next chunk"] == 16 and cuts["second batch"] == 49 + 60
    assert cuts["after phase 1, mid-chunk"] == 49 + 60 + 41 + 45 + 8 // 2 + 1


def test_checker_passes_real_phased_ttt(cfg: Config, model: GPT, data, docs_stream: Tensor) -> None:
    _, luts = data
    ttt = ttt_eval(cfg, model, luts)
    order = ttt.order(docs_stream)
    assert sorted(order.tolist()) == list(range(docs_stream.numel() - 1))  # a permutation of the targets
    cuts = cl.ttt_cuts(docs_stream, cfg)
    rows = cl.check_eval(ttt, docs_stream, cuts + [("last round", int(0.9 * len(order)))], cfg.vocab_size, "ttt", 0,
                         ttt.probe, order=order)
    assert_all_pass(rows)
    assert len(rows) == 2 + 5 and ttt.results[0][1] != ttt.results[1][1]  # a perturbation changes the run


def test_processing_order_is_not_the_stream_order(cfg: Config, model: GPT, data, docs_stream: Tensor) -> None:
    """The stream-order check would be wrong for the phased TTT: a perturbation late in the stream (a long document)
    changes scores of earlier stream positions (shorter documents processed after it), legally."""
    _, luts = data
    ttt = ttt_eval(cfg, model, luts)
    k = sum(DOC_LENGTHS[:4])  # the start of document 4; documents 0 and 2 before it are scored after phase 1,
    # which trained on document 6, after it (targets from k on get new tokens, BOS kept: the same schedule)
    rows = cl.check_eval(ttt, docs_stream, [("", k)], cfg.vocab_size, "ttt", order=torch.arange(docs_stream.numel() - 1))
    assert not rows[1].ok and "before the cut changed" in rows[1].details, cl.format_table(rows)


def test_adapt_before_score_is_caught(cfg: Config, model: GPT, data, docs_stream: Tensor, monkeypatch) -> None:
    """The classic illegal TTT, per step: train on the chunk, then score it (issue #1017 C3)."""
    _, luts = data
    real_step = phased_ttt.ttt_step

    def adapt_then_score(logits_fn, lora, opt, rows, ev, *args, **kwargs):
        with torch.enable_grad():
            nll = F.cross_entropy(logits_fn(rows.x, lora).float().flatten(0, 1), rows.y.flatten(), reduction="none")
        opt.zero_grad()
        (nll.view_as(rows.y) * rows.score).sum().backward()
        opt.step()
        return real_step(logits_fn, lora, opt, dataclasses.replace(rows, train=rows.train & False), ev, *args, **kwargs)

    monkeypatch.setattr(phased_ttt, "ttt_step", adapt_then_score)
    ttt = ttt_eval(cfg, model, luts)
    rows = cl.check_eval(ttt, docs_stream, cl.ttt_cuts(docs_stream, cfg), cfg.vocab_size, "ttt",
                         order=ttt.order(docs_stream))
    assert [r.ok for r in rows if r.check == "C4 single pass"] == [True]  # single pass, yet illegal
    bad = [r for r in perturb_rows(rows) if not r.ok]
    assert bad and "first step, mid-chunk" in bad[0].cut and "before the cut changed" in bad[0].details, \
        cl.format_table(rows)


def test_global_phase_on_unscored_documents_is_caught(cfg: Config, model: GPT, data, docs_stream: Tensor,
                                                       monkeypatch) -> None:
    """A global phase that trains on the whole stream (documents not scored yet included) is caught at the cut
    after the first phase, and only there: nothing before it used the phase."""
    _, luts = data
    real_sgd = phased_ttt.global_sgd
    seen: list[Tensor] = []

    def sgd_on_everything(model, toks, cfg, ev):
        return real_sgd(model, seen[-1], cfg, ev)

    def run(toks: Tensor) -> tuple[Tensor, Tensor]:
        seen.append(toks)
        return ttt(toks)

    monkeypatch.setattr(phased_ttt, "global_sgd", sgd_on_everything)
    ttt = ttt_eval(cfg, model, luts)
    rows = cl.check_eval(run, docs_stream, cl.ttt_cuts(docs_stream, cfg), cfg.vocab_size, "ttt",
                         order=ttt.order(docs_stream))
    assert [r.ok for r in perturb_rows(rows)] == [True, True, True, False], cl.format_table(rows)
    assert "after phase 1" in perturb_rows(rows)[-1].cut


def test_rescoring_is_caught(cfg: Config, model: GPT, data, docs_stream: Tensor, monkeypatch) -> None:
    """Score, adapt, rescore the chunk with the warmer adapters and keep the better loss (C4)."""
    _, luts = data
    real_step = phased_ttt.ttt_step

    def rescore(logits_fn, lora, opt, rows, ev, luts, nll_out=None, hits_out=None):
        first = nll_out.clone()
        sums = real_step(logits_fn, lora, opt, rows, ev, luts, nll_out, hits_out)
        real_step(logits_fn, lora, opt, dataclasses.replace(rows, train=rows.train & False), ev, luts, nll_out, hits_out)
        torch.fmin(nll_out, first, out=nll_out)
        return sums

    monkeypatch.setattr(phased_ttt, "ttt_step", rescore)
    rows = cl.check_eval(ttt_eval(cfg, model, luts), docs_stream, [], cfg.vocab_size, "ttt")
    assert len(rows) == 1 and not rows[0].ok and "scored 2x" in rows[0].details, cl.format_table(rows)


def perturb_rows(rows: list[cl.Row]) -> list[cl.Row]:
    return [r for r in rows if r.check.startswith("C1")]


def test_noncausal_attention_is_caught(cfg: Config, model: GPT, data, monkeypatch) -> None:
    """A window that attends to its future (a dropped causal mask) leaks later tokens into earlier scores."""
    tokens, luts = data

    def bidirectional(q: Tensor, k: Tensor, v: Tensor, fa3: object = None, docs: object = None) -> Tensor:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              enable_gqa=True).transpose(1, 2)

    monkeypatch.setattr(train_gpt, "attention", bidirectional)
    sliding = cl.SlidingEval(model, cfg, luts, 4)
    cuts = cuts_for("sliding")
    rows = perturb_rows(cl.check_eval(sliding, tokens, cuts, cfg.vocab_size, "sliding"))
    # windows end on stride multiples: only cuts off that grid see a leak that stays inside a window
    assert [r.ok for r in rows] == [k % S in (0, S - 1) for _, k in cuts], cl.format_table(rows)
    assert sum(not r.ok for r in rows) >= 2


def test_eval_that_ignores_its_tokens_fails_the_perturbation_check(data) -> None:
    tokens, _ = data
    rows = cl.check_eval(lambda t: (torch.ones(N, dtype=torch.float64), torch.ones(N, dtype=torch.int64)),
                         tokens, cuts_for("sliding"), 512, "sliding")
    assert [r.ok for r in rows] == [True] + [False] * len(cuts_for("sliding"))
    assert "saw nothing" in rows[1].details


# --- C2 ----------------------------------------------------------------------------------------------------------------

def test_target_in_input_is_caught_by_c2(cfg: Config, model: GPT, data) -> None:
    """An off-by-one window whose input includes the target token: no later token leaks, so C1 passes, but the
    scored loss is not the prefix's softmax."""
    tokens, luts = data

    def peek(x: Tensor) -> Tensor:  # score_windows' x is tokens[pos]; shift it to tokens[pos + 1]
        return model.forward_logits(torch.cat((x[:, 1:], x[:, -1:]), dim=1))

    def peeking(toks: Tensor) -> tuple[Tensor, Tensor]:
        _, nll, hits = run_score(peek, toks, train_gpt.window_starts(N, L, S), S, luts)
        return nll, hits

    honest = cl.SlidingEval(model, cfg, luts, 4)
    rows = cl.check_eval(peeking, tokens, [("", 100)], cfg.vocab_size, "sliding", probe_fn=honest.probe)
    assert [(r.check, r.ok) for r in rows] == [("C4 single pass", True), ("C2 normalized", False),
                                               ("C1 causality", True)], cl.format_table(rows)
    assert "not -log softmax" in rows[1].details


def test_c2_catches_a_truncated_vocab_and_an_unnormalized_gold_bonus(cfg: Config, model: GPT, data) -> None:
    tokens, luts = data
    sliding = cl.SlidingEval(model, cfg, luts, 4)
    nll, _ = sliding(tokens)
    assert cl.check_normalized(sliding.probe(tokens), tokens, nll, cfg.vocab_size, "sliding").ok  # control

    # 1. the alphabet cut to the ids the val stream uses (a statistic of future tokens), renormalized over them
    ids = tokens.unique()
    assert len(ids) < cfg.vocab_size
    remapped = torch.searchsorted(ids, tokens)

    def subset_logits(x: Tensor) -> Tensor:
        return model.forward_logits(ids[x])[..., ids]

    _, sub_nll, _ = run_score(subset_logits, remapped, train_gpt.window_starts(N, L, S), S, luts)
    starts = train_gpt.window_starts(N, L, S)[[0, -1]]
    row = cl.check_normalized(cl.window_logits(subset_logits, remapped, starts, L, S), remapped, sub_nll,
                              cfg.vocab_size, "sliding")
    assert not row.ok and "not the full vocab" in row.details

    # 2. an n-gram-cache style boost of the gold token's probability, never renormalized (sums to > 1)
    boosted = -torch.log(torch.clamp(torch.exp(-nll) * 1.5, max=1.0))
    row = cl.check_normalized(sliding.probe(tokens), tokens, boosted, cfg.vocab_size, "sliding")
    assert not row.ok and "not -log softmax" in row.details


# --- CLI ---------------------------------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/check_legality.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_cli_passes_a_fresh_artifact(tiny_dataset, cfg: Config, model: GPT, tmp_path: Path) -> None:
    run_cfg = dataclasses.replace(cfg, passthrough_numel=256,  # so the embedding and MLP matrices are quantized
                                  ttt_batch_size=1, ttt_chunk_size=32, ttt_eval_seq_len=32)  # a short default prefix
    qtensors = quantize_state_dict(model.state_dict(), {}, passthrough_numel=run_cfg.passthrough_numel)
    assert any(q.kind != "passthrough" for q in qtensors)
    artifact = tmp_path / "final_model.int6.ptz"
    save_artifact(artifact, encode_artifact(qtensors, codec=run_cfg.compressor))
    (tmp_path / "run_summary.json").write_text(json.dumps({"config": dataclasses.asdict(run_cfg)}))
    proc = run_cli("--artifact", str(artifact), "--data-dir", str(tiny_dataset.data_dir),
                   "--tokenizer", str(tiny_dataset.tokenizer))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    val = shards.load_val_tokens(str(tiny_dataset.data_dir / shards.VAL_GLOB), L, tiny_dataset.vocab_size)
    start, length = phased_ttt.find_docs(val)[2 * 2 * 1 - 1]  # two rounds of 2 lanes x 1 document
    assert f"val prefix: {start + length - 1} targets" in proc.stdout
    checks = int(lines[-1].split()[2])
    assert lines[-1].startswith("PASS: all") and checks >= 10 and sum(" PASS " in line for line in lines) == checks
    assert "(after phase 1, mid-chunk)" in proc.stdout, proc.stdout


def test_cli_bad_input_is_one_line_exit_2(tiny_dataset, tmp_path: Path) -> None:
    missing = tmp_path / "missing.ptz"
    proc = run_cli("--artifact", str(missing), "--data-dir", str(tiny_dataset.data_dir),
                   "--tokenizer", str(tiny_dataset.tokenizer))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr == f"error: {missing}: no such artifact\n" and proc.stdout == "", proc.stderr


def test_load_config_rejects_bad_summaries(tmp_path: Path) -> None:
    artifact = tmp_path / "final_model.int6.ptz"
    with pytest.raises(cl.CheckError, match="nope.json: no such config file"):
        cl.load_config(tmp_path / "nope.json", artifact)
    summary = tmp_path / "run_summary.json"
    summary.write_text(json.dumps({"config": {**dataclasses.asdict(Config(**TINY)), "model_dims": 64}}))
    with pytest.raises(cl.CheckError, match=r"unknown to this train_gpt.py: \['model_dims'\]"):
        cl.load_config(None, artifact)  # found beside the artifact
    raw = dataclasses.asdict(Config(**TINY))
    del raw["passthrough_numel"]  # an artifact from before the field existed
    summary.write_text(json.dumps({"config": raw}))
    cfg, source = cl.load_config(None, artifact)
    assert cfg == Config(**{**TINY, "passthrough_numel": Config().passthrough_numel})
    assert source.endswith("(defaults for passthrough_numel)")
    summary.write_text("{}")
    with pytest.raises(cl.CheckError, match="not a run_summary.json"):
        cl.load_config(summary, artifact)
