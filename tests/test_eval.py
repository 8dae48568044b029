"""train_gpt's evaluation (plain, sliding, score-first TTT) and tools/check_legality.py: coverage, TTT order, and
the legality checker passing the real eval paths while catching illegal variants built from the same blocks."""

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
from data.shards import write_shard
from quant import encode_artifact, quantize_state_dict, save_artifact
from tools import legality as cl
from train_gpt import GPT, Config

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def EV(luts: tuple, batch_windows: int) -> train_gpt.EvalContext:  # noqa: N802
    return train_gpt.EvalContext(luts, batch_windows)
L, S, C = 32, 8, 64  # window, stride, TTT chunk
N = 160  # targets: chunks 0..63, 64..127 and a partial 128..159
TINY = {**TINY_TRAIN, **dict(num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, loop_start=0, loop_end=0,  # smaller
                             xsa_last_n=2, parallel_residual_start=1, train_seq_len=L, eval_seq_len=L, eval_stride=S,
                             ttt_chunk_tokens=C, ttt_epochs=2, ttt_lr=0.05, compressor="zstd")}


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


def test_ttt_chunks_partition_targets_by_chunk(model: GPT, data) -> None:
    tokens, luts = data
    chunks = train_gpt.ttt_chunks(N, L, S, C)
    assert len(chunks) == 3
    assert np.concatenate(chunks).tolist() == train_gpt.window_starts(N, L, S).tolist()
    for c, starts in enumerate(chunks):
        _, _, hits = run_score(model.forward_logits, tokens, starts, S, luts)
        want = torch.zeros(N, dtype=torch.int64)
        want[c * C : min((c + 1) * C, N)] = 1  # the last chunk is partial
        assert torch.equal(hits, want), f"chunk {c} scored {torch.nonzero(hits).flatten().tolist()}"


# --- eval_ttt --------------------------------------------------------------------------------------------------------

def test_ttt_with_lr_zero_equals_sliding(cfg: Config, model: GPT, data) -> None:
    tokens, luts = data
    sliding = train_gpt.evaluate(model.forward_logits, tokens, L, S, EV(luts, 4))
    ttt = train_gpt.eval_ttt(copy.deepcopy(model), tokens, dataclasses.replace(cfg, ttt_lr=0.0), EV(luts, 4))
    assert ttt[0] == pytest.approx(sliding[0], rel=1e-12) and ttt[1] == pytest.approx(sliding[1], rel=1e-12)


def test_ttt_scores_before_adapting_and_never_trains_on_the_last_chunk(cfg: Config, model: GPT, data,
                                                                      monkeypatch) -> None:
    tokens, luts = data
    events: list[str] = []
    real_adapt = train_gpt.adapt_on_chunk

    def adapt(m, opt, toks, chunk, *args, **kwargs):
        events.append(f"adapt {chunk}")
        return real_adapt(m, opt, toks, chunk, *args, **kwargs)

    monkeypatch.setattr(train_gpt, "adapt_on_chunk", adapt)
    adapted = copy.deepcopy(model)

    def logits_fn(x: Tensor) -> Tensor:
        events.append("score")
        return adapted.forward_logits(x)

    ttt = train_gpt.eval_ttt(adapted, tokens, cfg, EV(luts, 64), logits_fn)  # 64: one score call per chunk
    assert events == ["score", "adapt 0", "score", "adapt 1", "score"]
    sliding = train_gpt.evaluate(model.forward_logits, tokens, L, S, EV(luts, 4))
    assert abs(ttt[1] - sliding[1]) > 1e-6, "TTT with lr > 0 left the score unchanged: the lr-0 test proves nothing"
    # the same weights come from adapting on chunks 0..K-2 alone, with record P's cosine lr over chunks
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
    for c in range(2):
        for group in opt.param_groups:
            group["lr"] = cfg.ttt_lr * 0.5 * (1 + math.cos(math.pi * c / 2))
        real_adapt(ref, opt, tokens, c, C, L, cfg.ttt_epochs, EV(luts, 4))
    for (name, a), b in zip(adapted.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs from adapting on chunks 0..1 only"


# --- the checker on the real eval paths --------------------------------------------------------------------------------

def cuts_for(mode: str) -> list[tuple[str, int]]:
    return cl.default_cuts(N, L, S, C, mode)


def assert_all_pass(rows: list[cl.Row]) -> None:
    assert rows and all(r.ok for r in rows), cl.format_table(rows)


def test_checker_passes_real_sliding(cfg: Config, model: GPT, data) -> None:
    tokens, luts = data
    sliding = cl.SlidingEval(model, cfg, luts, 4)
    rows = cl.check_eval(sliding, tokens, cuts_for("sliding"), cfg.vocab_size, "sliding", 0, sliding.probe)
    assert_all_pass(rows)
    assert {r.check for r in rows} == {"C1 causality", "C2 normalized", "C4 single pass"}
    assert len(rows) == 2 + len(cuts_for("sliding")) >= 5


def test_checker_passes_real_ttt(cfg: Config, model: GPT, data) -> None:
    tokens, luts = data
    ttt = cl.TTTEval(lambda: copy.deepcopy(model), cfg, luts, 4)
    cuts = cuts_for("ttt")
    assert [k for _, k in cuts] == [L + 3 * S, C - 1, C + 1, C + C // 2 + S // 2 + 1]  # mid-chunk: chunk 1 of 3
    rows = cl.check_eval(ttt, tokens, cuts + [("last chunk", 2 * C + 1)], cfg.vocab_size, "ttt", 0, ttt.probe)
    assert_all_pass(rows)
    assert ttt.results[0][1] != ttt.results[1][1]  # a perturbation changes the run


def perturb_rows(rows: list[cl.Row]) -> list[cl.Row]:
    return [r for r in rows if r.check.startswith("C1")]


def test_adapt_before_score_is_caught(cfg: Config, model: GPT, data) -> None:
    """The classic illegal pre-eval TTT, per chunk: train on the chunk, then score it (issue #1017 C3)."""
    tokens, luts = data

    def adapt_then_score(toks: Tensor) -> tuple[Tensor, Tensor]:
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
        nll, hits = torch.full((N,), float("nan"), dtype=torch.float64), torch.zeros(N, dtype=torch.int64)
        chunks = train_gpt.ttt_chunks(N, L, S, C)
        for c, starts in enumerate(chunks):
            if c < len(chunks) - 1:
                train_gpt.adapt_on_chunk(m, opt, toks, c, C, L, cfg.ttt_epochs, EV(luts, 4))
            train_gpt.score_windows(m.forward_logits, toks, starts, L, S, EV(luts, 4), nll, hits)
        return nll, hits

    rows = cl.check_eval(adapt_then_score, tokens, cuts_for("ttt"), cfg.vocab_size, "ttt")
    assert [r.ok for r in rows if r.check == "C4 single pass"] == [True]  # single pass, yet illegal
    bad = [r for r in perturb_rows(rows) if not r.ok]
    assert bad and "before the cut changed" in bad[0].details, cl.format_table(rows)


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


def test_rescoring_is_caught(cfg: Config, model: GPT, data) -> None:
    """Score, adapt, rescore the chunk with the warmer weights and keep the better loss (C4)."""
    tokens, luts = data

    def rescore(toks: Tensor) -> tuple[Tensor, Tensor]:
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
        nll, hits = torch.full((N,), float("nan"), dtype=torch.float64), torch.zeros(N, dtype=torch.int64)
        chunks = train_gpt.ttt_chunks(N, L, S, C)
        for c, starts in enumerate(chunks):
            train_gpt.score_windows(m.forward_logits, toks, starts, L, S, EV(luts, 4), nll, hits)
            if c < len(chunks) - 1:
                train_gpt.adapt_on_chunk(m, opt, toks, c, C, L, cfg.ttt_epochs, EV(luts, 4))
                again = nll.clone()
                train_gpt.score_windows(m.forward_logits, toks, starts, L, S, EV(luts, 4), again, hits)
                nll = torch.minimum(nll, again)
        return nll, hits

    rows = cl.check_eval(rescore, tokens, [], cfg.vocab_size, "ttt")
    assert len(rows) == 1 and not rows[0].ok and "scored 2x" in rows[0].details, cl.format_table(rows)


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
    run_cfg = dataclasses.replace(cfg, passthrough_numel=256)  # so the embedding and MLP matrices are quantized
    qtensors = quantize_state_dict(model.state_dict(), {}, passthrough_numel=run_cfg.passthrough_numel)
    assert any(q.kind != "passthrough" for q in qtensors)
    artifact = tmp_path / "final_model.int6.ptz"
    save_artifact(artifact, encode_artifact(qtensors, codec=run_cfg.compressor))
    (tmp_path / "run_summary.json").write_text(json.dumps({"config": dataclasses.asdict(run_cfg)}))
    proc = run_cli("--artifact", str(artifact), "--data-dir", str(tiny_dataset.data_dir),
                   "--tokenizer", str(tiny_dataset.tokenizer))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("PASS: all 12 checks passed"), proc.stdout
    assert f"val prefix: {C + L} targets" in proc.stdout
    assert sum(" PASS " in line for line in lines) == 12


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
