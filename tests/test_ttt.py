"""Record N's phased score-first TTT: the adapters in the model's one forward (train_gpt.TTTAdapters) and the driver
(evals/phased_ttt.py): documents, batches, windows, score-first steps, warm-started lanes, global phases at their
boundaries, every target scored once, and the same score on 2 gloo ranks as on 1."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL
from torch import Tensor

import train_gpt
from data.shards import BOS_ID
from evals import phased_ttt as pt
from train_gpt import GPT, Config, EvalContext, TTTAdapters

VOCAB = TINY_MODEL["vocab_size"]
TTT = dict(ttt_chunk_size=8, ttt_eval_seq_len=24, ttt_batch_size=2, ttt_lanes=2, ttt_lora_rank=4, ttt_lora_lr=0.01,
           phased_ttt_prefix_docs=6, phased_ttt_num_phases=3, global_ttt_chunk_tokens=128, global_ttt_lr=0.01,
           eval_stride=32)
CFG = Config(**{**TINY_MODEL, **TTT})
DOC_LENGTHS = [23, 41, 17, 60, 30, 9, 45, 35, 12, 50, 28, 19, 33]  # the stream's documents (13: a short batch)
LUTS = (torch.arange(VOCAB, dtype=torch.int16) % 3 + 1, torch.arange(VOCAB) % 2 == 0, torch.arange(VOCAB) % 5 == 0)


def model_with_noise(cfg: Config = CFG, seed: int = 0) -> GPT:
    """A random looped model in eval mode; every weight noised (zero-initialized projections and gates would hide
    what they do)."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.looping = True
    return model.eval()


def stream(lengths: list[int] = DOC_LENGTHS, seed: int = 0) -> Tensor:
    """Random tokens cut into documents of the given lengths: a BOS at each start and nowhere else."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(BOS_ID + 1, VOCAB, (sum(lengths),), generator=g)
    tokens[torch.tensor([0, *lengths[:-1]]).cumsum(0)] = BOS_ID
    return tokens


def adapters(model: GPT, bsz: int, seed: int = 0, b_std: float = 0.0) -> TTTAdapters:
    lora = TTTAdapters(model, bsz, 4, 144.0, torch.Generator().manual_seed(seed))
    if b_std:
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if name.endswith(".B"):
                    p.normal_(0, b_std, generator=torch.Generator().manual_seed(len(name)))
    return lora


def run_ttt(model: GPT, tokens: Tensor, cfg: Config = CFG, **kwargs) -> tuple[float, float]:
    make = lambda bsz, gen: TTTAdapters(model, bsz, cfg.ttt_lora_rank, cfg.ttt_lora_alpha, gen)
    return pt.eval_phased_ttt(model, tokens, cfg, EvalContext(LUTS, 1), make, **kwargs)


# --- the adapters in the forward -------------------------------------------------------------------------------------

@pytest.mark.parametrize("looping", [True, False])
def test_fresh_adapters_leave_forward_logits_exactly_unchanged(looping: bool) -> None:
    model = model_with_noise()
    model.looping = looping
    ids = stream()[:128].view(2, 64)
    lora = adapters(model, 2, seed=3)
    assert len(lora.passes) == (6 if looping else 4)  # one set per layer pass: layers 1-2 twice when looped
    with torch.no_grad():
        assert torch.equal(model.forward_logits(ids, lora), model.forward_logits(ids))
        lora.passes[-1]["mlp"].B.add_(0.1)
        assert not torch.equal(model.forward_logits(ids, lora), model.forward_logits(ids))


def test_every_adapter_changes_the_forward_and_only_its_own_slot() -> None:
    model = model_with_noise()
    ids = stream()[:96].view(2, 48)
    base = model.forward_logits(ids).detach()
    lora = adapters(model, 2)
    targets = [("head", lora.head)] + [(f"pass {p} {k}", m) for p, d in enumerate(lora.passes) for k, m in d.items()]
    assert len(targets) == 1 + 6 * 5
    for name, mod in targets:
        with torch.no_grad():
            mod.B[1].normal_(0, 0.5)
            out = model.forward_logits(ids, lora)
            mod.B.zero_()
        assert torch.equal(out[0], base[0]), f"{name}: slot 1's adapter changed document slot 0"
        assert not torch.allclose(out[1], base[1]), f"{name}: the adapter does nothing"


def test_head_adapter_is_added_before_the_softcap() -> None:
    model = model_with_noise()
    lora = adapters(model, 1)
    with torch.no_grad():
        lora.head.B.fill_(100.0)
        logits = model.forward_logits(stream()[:32][None], lora)
    assert logits.abs().max() <= CFG.logit_softcap and logits.abs().max() > 0.99 * CFG.logit_softcap


def test_qkv_adapters_equal_merged_weights_in_the_plain_forward() -> None:
    """One code path: with one document slot, Q/K/V adapters are the weight deltas s*B@A, so the TTT forward must equal
    the plain forward of a model with those deltas merged, through SmearGate, the sparse gate, XSA, both lanes and
    document isolation. Adapters on layer 0 (one pass) and layer 3 (the two-lane layer, one pass)."""
    model = model_with_noise()
    ids = stream()[:64][None]
    lora = adapters(model, 1, b_std=0.05)
    enc, dec = train_gpt.layer_schedule(4, 1, 2, 1, True)
    passes = {0: enc.index(0), 3: len(enc) + dec.index(3)}
    with torch.no_grad():
        for p, d in enumerate(lora.passes):  # keep Q, K, V of the passes of layers 0 and 3 only
            for k, mod in d.items():
                if p not in passes.values() or k not in "qkv":
                    mod.B.zero_()
        lora.head.B.zero_()
        merged = copy.deepcopy(model)
        for layer, p in passes.items():
            for k, lin in (("q", "c_q"), ("k", "c_k"), ("v", "c_v")):
                ad = lora.passes[p][k]
                getattr(merged.blocks[layer].attn, lin).weight.add_(ad.scale * ad.B[0] @ ad.A[0])
        torch.testing.assert_close(model.forward_logits(ids, lora), merged.forward_logits(ids), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model.forward_logits(ids, lora), model.forward_logits(ids), atol=1e-3)


def test_ttt_forward_keeps_smear_gate_sparse_gate_and_document_isolation(monkeypatch) -> None:
    model = model_with_noise()
    lora = adapters(model, 1, b_std=0.05)
    ids = stream([20, 44])[None]  # document 2 starts at 20
    with torch.no_grad():
        out = model.forward_logits(ids, lora)
        other = ids.clone()
        other[0, 1:20] = (other[0, 1:20] + 7) % (VOCAB - 2) + 2  # document 1 rewritten
        moved = model.forward_logits(other, lora)
        assert torch.equal(moved[0, 20:], out[0, 20:]) and not torch.allclose(moved[0, :20], out[0, :20])
        for patch in ("smear", "attention"):
            with monkeypatch.context() as m:
                if patch == "smear":
                    m.setattr(train_gpt, "smear", lambda x, ids, w, lam: x)
                else:  # the sparse gate: drop it by zeroing its weights (sigmoid(0) = 0.5 everywhere)
                    for b in model.blocks:
                        m.setattr(b.attn, "attn_gate_w", torch.nn.Parameter(torch.zeros_like(b.attn.attn_gate_w)))
                assert not torch.allclose(model.forward_logits(ids, lora), out), f"{patch} is not in the TTT forward"
    assert model.cfg.smear_gate_enabled and model.cfg.sparse_attn_gate_enabled and model.cfg.doc_isolation


def test_gradients_reach_the_adapters_only() -> None:
    model = model_with_noise()
    model.requires_grad_(False)
    lora = adapters(model, 2, b_std=0.01)
    model.forward_logits(stream()[:64].view(2, 32), lora).float().logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters())


# --- documents, batches, windows ---------------------------------------------------------------------------------------

def test_documents_run_bos_to_next_bos_inclusive_and_partition_the_targets() -> None:
    t = torch.tensor([1, 5, 6, 1, 7, 1, 8, 9, 9])
    assert pt.find_docs(t) == [(0, 4), (3, 3), (5, 4)]  # the last runs to the end
    assert pt.find_docs(torch.tensor([4, 5, 1, 6, 1])) == [(0, 3), (2, 3)]  # no leading BOS; a final lone BOS
    for tokens in (stream(), stream()[5:], torch.tensor([1, 1, 1, 2, 1])):
        covered = torch.cat([torch.arange(s, s + n - 1) for s, n in pt.find_docs(tokens)])
        assert covered.tolist() == list(range(tokens.numel() - 1))


def test_plan_sorts_by_length_longest_batch_first_with_phase_boundaries() -> None:
    plan = pt.make_plan(stream(), 2, 6, 3)
    lengths = [n for _, n in plan.docs]
    assert [lengths[d] for d in plan.order] == sorted(lengths)
    assert plan.queue[0] == plan.order[-1:]  # 13 documents: the short batch holds the longest one, and goes first
    assert [b for b in plan.queue[1:]] == [plan.order[i : i + 2] for i in range(10, -1, -2)]
    assert plan.boundaries == [2, 4, 6]
    assert pt.make_plan(stream(), 2, 0, 3).boundaries == [] and pt.make_plan(stream(), 2, 99, 2).boundaries == [6, 13]


def test_chunk_rows_windows_scores_and_training_positions() -> None:
    tokens = torch.arange(1000) % (VOCAB - 2) + 2
    starts, preds = torch.tensor([100, 500, 0]), torch.tensor([30, 9, 0])  # slot 2 pads
    C, W = 8, 20
    for ci in range(4):
        rows = pt.chunk_rows(tokens, starts, preds, ci, C, W, pt.context(ci, C, W, False))
        assert rows.x.shape == (3, min((ci + 1) * C, W))
        for b in range(3):
            s, P = int(starts[b]), int(preds[b])
            nc = -(-P // C)
            if ci >= nc:
                assert not rows.score[b].any() and not rows.train[b].any()
                continue
            end = min((ci + 1) * C, P)
            lo = max(0, end - W)
            assert rows.x[b, : end - lo].tolist() == tokens[s + lo : s + end].tolist()  # the window starts the row
            assert rows.y[b, : end - lo].tolist() == tokens[s + lo + 1 : s + end + 1].tolist()
            scored = rows.target[b][rows.score[b]].tolist()
            assert scored == list(range(s + ci * C, s + end))
            assert rows.train[b].sum() == (C if ci < nc - 1 else 0)  # a document's last chunk is never trained on
    assert pt.context_sizes(48, 2048, True) == [256, 512, 1024, 2048]  # record N compiled: four shapes
    assert pt.context_sizes(8, 20, False) == [8, 16, 20] and pt.context_sizes(8, 20, True) == [8, 16, 20]


# --- the driver -------------------------------------------------------------------------------------------------------

def test_lr_zero_without_phases_is_the_windowed_base_model_with_the_project_bytes() -> None:
    """No adaptation: the TTT score is each document's chunks scored from their windows by the base model, with
    the bytes every other eval counts (base bytes + a leading space unless the previous token is a boundary)."""
    model, tokens = model_with_noise(), stream()
    cfg = dataclasses.replace(CFG, ttt_lora_lr=0.0, phased_ttt_prefix_docs=0)
    loss, bpb = run_ttt(model, tokens, cfg)
    nll = nbytes = count = 0.0
    base, space, boundary = LUTS
    for s, n in pt.find_docs(tokens):
        for ci in range(-(-(n - 1) // cfg.ttt_chunk_size)):
            end = min((ci + 1) * cfg.ttt_chunk_size, n - 1)
            lo = max(0, end - cfg.ttt_eval_seq_len)
            x, y = tokens[s + lo : s + end], tokens[s + lo + 1 : s + end + 1]
            with torch.no_grad():
                ce = F.cross_entropy(model.forward_logits(x[None])[0].double(), y, reduction="none")
            keep = slice(ci * cfg.ttt_chunk_size - lo, None)
            nll += float(ce[keep].sum())
            nbytes += float((base[y] + (space[y] & ~boundary[x]))[keep].sum())
            count += len(y[keep])
    assert count == tokens.numel() - 1
    assert loss == pytest.approx(nll / count, rel=1e-5) and bpb == pytest.approx(nll / math.log(2) / nbytes, rel=1e-5)


def test_byte_sidecar_replaces_the_luts() -> None:
    """With a byte sidecar (a transformed tokenizer), target j counts val_bytes[j + 1], as in every other eval."""
    tokens = stream()
    val_bytes = torch.randint(0, 5, (tokens.numel(),), generator=torch.Generator().manual_seed(1))
    make = lambda model: (lambda bsz, gen: TTTAdapters(model, bsz, CFG.ttt_lora_rank, CFG.ttt_lora_alpha, gen))
    m1, m2 = model_with_noise(), model_with_noise()
    loss, bpb = pt.eval_phased_ttt(m1, tokens, CFG, EvalContext(LUTS, 1, val_bytes=val_bytes), make(m1))
    loss_luts, _ = pt.eval_phased_ttt(m2, tokens, CFG, EvalContext(LUTS, 1), make(m2))
    assert loss == loss_luts
    assert bpb == pytest.approx(loss * (tokens.numel() - 1) / math.log(2) / int(val_bytes[1:].sum()), rel=1e-12)


def test_every_target_scored_once_and_a_lost_document_is_an_error(monkeypatch) -> None:
    model, tokens = model_with_noise(), stream()
    n = tokens.numel() - 1
    nll, hits = torch.full((n,), math.nan, dtype=torch.float64), torch.zeros(n, dtype=torch.int64)
    run_ttt(model, tokens, nll_out=nll, hits_out=hits)
    assert hits.eq(1).all() and torch.isfinite(nll).all()
    real = pt.find_docs
    monkeypatch.setattr(pt, "find_docs", lambda t: real(t)[:-1])
    with pytest.raises(RuntimeError, match=f"expected each of {n} exactly once"):
        run_ttt(model_with_noise(), tokens)


def test_scores_first_then_adapts_and_lanes_warm_start_a(monkeypatch) -> None:
    """Each step's score is the loss of the adapters before its update; every batch starts at B = 0 (its chunk 0 is
    the base model's), a lane's next batch gets A as the last one left it, and a short batch gets its own set."""
    real_step, real_batch = pt.ttt_step, pt.run_batch
    steps, batches = [], []

    def step(logits_fn, lora, opt, rows, ev, luts, nll_out=None, hits_out=None):
        with torch.no_grad():
            y = rows.y
            before = F.cross_entropy(logits_fn(rows.x, lora).float().flatten(0, 1), y.flatten(), reduction="none")
        sums = real_step(logits_fn, lora, opt, rows, ev, luts, nll_out, hits_out)
        steps.append((float(sums[0]), float(before.double()[rows.score.flatten()].sum()), bool(rows.train.any())))
        return sums

    def batch(logits_fn, lora, *args, **kwargs):
        loras = [m for m in lora.modules() if isinstance(m, train_gpt.LoRA)]
        rec = dict(lora=lora, b_zero=all(float(m.B.detach().abs().sum()) == 0 for m in loras),
                   a_in=lora.passes[0]["q"].A.detach().clone())
        out = real_batch(logits_fn, lora, *args, **kwargs)
        batches.append({**rec, "a_out": lora.passes[0]["q"].A.detach().clone()})
        return out

    monkeypatch.setattr(pt, "ttt_step", step)
    monkeypatch.setattr(pt, "run_batch", batch)
    model, tokens = model_with_noise(), stream()
    run_ttt(model, tokens, dataclasses.replace(CFG, phased_ttt_prefix_docs=0))  # no phases: lanes live throughout
    assert all(score == pytest.approx(before, rel=1e-9) for score, before, _ in steps)
    assert any(trained for *_, trained in steps) and len({round(s, 6) for s, *_ in steps}) > 1
    plan = pt.make_plan(tokens, 2, 0, 3)
    assert len(batches) == len(plan.queue) == 7 and all(b["b_zero"] for b in batches)
    loras = [b["lora"] for b in batches]
    assert loras[0].head.A.size(0) == 1 and loras[0] not in loras[1:]  # the short batch: its own adapters
    assert loras[1::2] == [loras[1]] * 3 and loras[2::2] == [loras[2]] * 3  # lanes: queue position % 2
    for q in (3, 4, 5, 6):  # a lane's A comes back as its previous batch left it, and it learned there
        assert torch.equal(batches[q]["a_in"], batches[q - 2]["a_out"])
        assert not torch.equal(batches[q - 2]["a_out"], batches[q - 2]["a_in"])


def test_static_shapes_pad_a_short_batch_to_a_power_of_two_not_a_full_batch(monkeypatch) -> None:
    """A compiled TTT (static shapes) runs full batches at TTT_BATCH_SIZE rows and the short batch at the next power
    of two: record N's short batch holds its 16 longest documents (~2,000 steps), which padded to 64 rows would
    take ~4x as long on 8xH100. slot_sizes names the row counts the compile warm-up must cover."""
    assert [pt.batch_slots(n, 64, True) for n in (64, 16, 17, 1)] == [64, 16, 32, 1]
    assert pt.batch_slots(17, 64, False) == 17
    tokens = stream(DOC_LENGTHS[:11])  # 11 documents in batches of 8: one full, one of 3
    cfg = dataclasses.replace(CFG, ttt_batch_size=8, phased_ttt_prefix_docs=0)
    real, rows = pt.ttt_step, []
    monkeypatch.setattr(pt, "ttt_step", lambda fn, lora, opt, r, *a, **k: rows.append(r.x.size(0)) or
                        real(fn, lora, opt, r, *a, **k))
    n = tokens.numel() - 1
    for static, expect in ((True, {4, 8}), (False, {3, 8})):
        rows.clear()
        model, hits = model_with_noise(), torch.zeros(n, dtype=torch.int64)
        make = lambda bsz, gen, m=model: TTTAdapters(m, bsz, cfg.ttt_lora_rank, cfg.ttt_lora_alpha, gen)
        pt.eval_phased_ttt(model, tokens, cfg, EvalContext(LUTS, 1, static_shapes=static), make, hits_out=hits)
        assert set(rows) == expect and hits.eq(1).all()
    assert pt.slot_sizes(tokens, cfg) == [4, 8]


def test_global_phases_run_at_the_boundaries_on_the_shortest_scored_documents(monkeypatch) -> None:
    calls: list[tuple[int, Tensor]] = []
    real_sgd, made = pt.global_sgd, []
    model, tokens = model_with_noise(), stream()

    def sgd(m, toks, cfg, ev):
        calls.append((len(made), toks.clone()))
        return real_sgd(m, toks, cfg, ev)

    def make(bsz, gen):
        made.append(bsz)
        return TTTAdapters(model, bsz, CFG.ttt_lora_rank, CFG.ttt_lora_alpha, gen)

    monkeypatch.setattr(pt, "global_sgd", sgd)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lines = []
    pt.eval_phased_ttt(model, tokens, CFG, EvalContext(LUTS, 1), make,
                       log=lambda kind, **v: lines.append(train_gpt.log_line(kind, **v)))
    plan = pt.make_plan(tokens, 2, 6, 3)
    # rounds of 2 batches: 1 + 2 = 3 documents (>= 2: phase 1), 7 (>= 4: phase 2), 11 (>= 6: phase 3), then 13
    assert lines[0] == "ttt_phased: total_docs:13 prefix_docs:6 suffix_docs:7 num_phases:3 boundaries:[2, 4, 6]"
    assert [line.split(" t:")[0] for line in lines[1:]] == ["ttpp: phase:1/3 pd:3 gd:2", "ttpp: phase:2/3 pd:7 gd:4",
                                                           "ttpp: phase:3/3 pd:11 gd:6"]
    scored = [plan.order.index(d) for r0 in range(0, 6, 2) for b in plan.queue[r0 : r0 + 2] for d in b]
    for k, ((n_made, toks), bound, done) in enumerate(zip(calls, [2, 4, 6], [3, 7, 11])):
        chosen = sorted(scored[:done])[:bound]  # the shortest `bound` of the documents scored so far
        want = torch.cat([tokens[s : s + n] for s, n in (plan.docs[plan.order[r]] for r in chosen)])
        assert torch.equal(toks, want), f"phase {k + 1} trained on other tokens"
        assert n_made == [2, 4, 6][k]  # adapter sets made before it: the short batch's and one per lane and round
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # the base model moved


def test_global_sgd_is_record_n_schedule(monkeypatch) -> None:
    """Chunks of GLOBAL_TTT_CHUNK_TOKENS cut into EVAL_SEQ_LEN rows, one step per chunk, the last one skipped, lr on a
    cosine over the chunks, clipped to 1.0."""
    model = model_with_noise()
    toks = stream([200, 210, 190])  # 600 tokens: chunks of 128 -> 5 chunks, 4 steps of 2 rows of 64
    seen, lrs = [], []
    real_forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, x, y: seen.append(x.clone()) or real_forward(self, x, y))
    real_step = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self: lrs.append(self.param_groups[0]["lr"]) or real_step(self))
    model.requires_grad_(True)
    pt.global_sgd(model, toks, CFG, EvalContext(LUTS, 1))
    assert [x.tolist() for x in seen] == [toks[c * 128 : (c + 1) * 128].view(2, 64).tolist() for c in range(4)]
    assert lrs == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * c / 4)) for c in range(4)])


# --- ranks ------------------------------------------------------------------------------------------------------------

def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, tokens = model_with_noise(), stream()
        make = lambda bsz, gen: TTTAdapters(model, bsz, CFG.ttt_lora_rank, CFG.ttt_lora_alpha, gen)
        result = pt.eval_phased_ttt(model, tokens, CFG, EvalContext(LUTS, 1, rank=rank, world_size=world), make)
        torch.save(dict(result=result, state=model.state_dict()), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_score_as_one(tmp_path) -> None:
    """Lanes (not ranks) carry the adapters and the phases come at round ends, so 2 ranks compute what 1 does; only
    the global SGD's gradients are summed in another order (rank partial sums), hence approx, not bit-equal."""
    import torch.multiprocessing as mp

    one = run_ttt(model_with_noise(), stream())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(2, port, str(tmp_path / "r")), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"r.{r}", weights_only=False) for r in (0, 1))
    assert r0["result"] == r1["result"]
    assert r0["result"] == pytest.approx(one, rel=1e-6, abs=0)
    for k, v in r0["state"].items():  # the phases moved both ranks' base models alike
        assert torch.equal(v, r1["state"][k]), k
