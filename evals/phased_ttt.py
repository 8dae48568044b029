"""Record N's phased score-first TTT with per-document LoRA (PR #1855; alpha/rank, warm A: PR #1767), the driver.
The adapters live in the model (train_gpt.TTTAdapters, GPT.forward_logits(ids, lora)); this module never imports
train_gpt (a record inlines it into train_gpt.py), so it receives the model, the config and the eval context.

Documents: each BOS to the next BOS inclusive (its last target is that BOS), the last one to the end of the stream.
They are sorted by length, cut into batches of TTT_BATCH_SIZE and processed longest batch first. In a batch every
document has its own adapter slot; its targets go in chunks of TTT_CHUNK_SIZE, each predicted from the window of
the last <= TTT_EVAL_SEQ_LEN document tokens ending at the chunk's end. A step SCORES the chunk of every document
(its losses and bytes go into the sums) and THEN, unless it is a document's last chunk, takes one AdamW step on the
sum over documents of the mean loss of that chunk. When PHASED_TTT_NUM_PHASES boundaries of scored documents are
crossed, the base model itself takes one epoch of SGD on the first `boundary` scored documents (global_sgd), and
the adapters start over.

How this differs from record N, and why it is still score-first. N's ranks pull batches from a lock-file counter in
/tmp and pause for a phase when a shared counter of scored documents crosses a boundary, so which rank runs which
batch (and so which batches warm each adapter's A) depends on timing. Here the schedule is static and has no files:
batch q of the queue runs on lane q % TTT_LANES, lane l on rank l % world_size; a lane keeps its adapters' A from
batch to batch (B zeroed, optimizer state new: N's warm start), so lanes play N's GPUs (TTT_LANES=8 as N's 8) and
the score does not depend on the world size. A round is TTT_LANES consecutive batches; a phase runs at the end of
the first round after which its boundary is reached (N: after each rank's batch in flight). Every dependency points
backwards in the processing order (batch q, chunk, slot, position; processing_order): a score uses the base
weights after the phases of earlier rounds (trained only on documents scored in them), its lane's A after earlier
batches of the lane, and its own slot's adapters after steps on earlier chunks of its own document; never a token
after its target in its document, nor a document scored later. tools/check_legality.py tests exactly this.
Other deviations: global SGD rows are EVAL_SEQ_LEN windows of the concatenated documents with the model's own
document isolation (N: one flat row with cu_seqlens), one step per GLOBAL_TTT_CHUNK_TOKENS chunk on the mean loss
of all its rows over all ranks (N: per 32 rows of a rank's share, the same for N's 16-row chunks); a short batch
gets fresh adapters as in N, their A drawn like every A from a generator seeded by (SEED, phase, lane).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from data.shards import BOS_ID, target_bytes


def find_docs(tokens: Tensor) -> list[tuple[int, int]]:
    """(start, length) of every document: a BOS to the next BOS inclusive, the last one to the end of the stream (a
    stream that does not start with a BOS starts with a document too; a lone final BOS has no target and is
    dropped). Document (s, l) holds targets s .. s+l-2, so the documents partition the stream's targets."""
    bos = torch.nonzero(tokens == BOS_ID).flatten().tolist()
    starts = bos if bos and bos[0] == 0 else [0, *bos]
    ends = [s + 1 for s in starts[1:]] + [tokens.numel()]
    return [(s, e - s) for s, e in zip(starts, ends) if e - s >= 2]


@dataclass(frozen=True)
class Plan:
    """The static schedule: documents, their indices by length (record N orders global-SGD documents so), the batch
    queue (document indices, each batch ascending by length) and the phase boundaries."""

    docs: list[tuple[int, int]]
    order: list[int]
    queue: list[list[int]]
    boundaries: list[int]


def make_plan(tokens: Tensor, batch_size: int, prefix_docs: int, num_phases: int) -> Plan:
    """Record N's batching: documents sorted by length (stable), cut into batches, longest batch first (ties keep
    their order); phase k's boundary is prefix * (k+1) / num_phases documents, prefix = min(docs, PREFIX_DOCS)."""
    docs = find_docs(tokens)
    order = sorted(range(len(docs)), key=lambda i: docs[i][1])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    queue = sorted(batches, key=lambda b: -docs[b[-1]][1])
    prefix, phases = min(len(docs), prefix_docs), max(1, num_phases)
    return Plan(docs, order, queue, [prefix * (k + 1) // phases for k in range(phases)] if prefix > 0 else [])


@dataclass(frozen=True)
class Rows:
    """One step's input rows (one per document slot, padded after the valid tokens): x, y; the target index each
    position predicts; which positions are scored (this chunk) and trained on (a full chunk that is not the
    document's last)."""

    x: Tensor
    y: Tensor
    target: Tensor
    score: Tensor
    train: Tensor


def chunk_rows(tokens: Tensor, starts: Tensor, preds: Tensor, ci: int, chunk: int, window: int, ctx: int) -> Rows:
    """Rows for chunk ci of documents (starts, preds = number of targets; 0 for a padding slot). A document's window
    is [end - window, end) clipped at 0, end = the chunk's end (its last target + 1), and it starts the row."""
    nc = (preds + chunk - 1) // chunk
    end = torch.where(nc - 1 == ci, preds, (ci + 1) * chunk)
    lo = (end - window).clamp(min=0)
    pos = torch.arange(ctx)
    valid = (nc > ci)[:, None] & (pos < (end - lo)[:, None])
    local = lo[:, None] + pos  # document-local target position of each row position
    target = torch.where(valid, starts[:, None] + local, 0)
    x, y = torch.where(valid, tokens[target], 0), torch.where(valid, tokens[target + 1], 0)
    score = valid & (local >= ci * chunk)
    return Rows(x, y, target, score, score & (nc - 1 > ci)[:, None])


def context(ci: int, chunk: int, window: int, static: bool) -> int:
    """Row length of chunk ci: the longest window, min((ci+1) * chunk, window) (record N); with static shapes (a
    compiled forward) rounded up to a power of two of at least window/8, at most the window: four shapes for a
    power-of-two window, well inside the compiler's recompile limit."""
    n = min((ci + 1) * chunk, window)
    return min(max(1 << (n - 1).bit_length(), window // 8), window) if static else n


def context_sizes(chunk: int, window: int, static: bool) -> list[int]:
    """Every row length a TTT eval uses (its compile warm-up)."""
    return sorted({context(ci, chunk, window, static) for ci in range(-(-window // chunk))})


def batch_slots(n: int, batch_size: int, static: bool) -> int:
    """Rows of a batch of n documents: n; with static shapes (a compiled step) the next power of two, at most
    TTT_BATCH_SIZE, so that full batches share one shape and the short batch (record N's ordering puts the
    remainder, e.g. 16 of 50,000 documents, on the longest documents) is not padded to a full batch: on 8xH100 its
    ~2,000 steps at 64 rows would take ~4x as long as at 16 (tools/planner.py)."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length()) if static else n


def slot_sizes(tokens: Tensor, cfg: object) -> list[int]:
    """Every row count a static-shape TTT eval of tokens uses (its compile warm-up; only the document count matters)."""
    plan = make_plan(tokens, cfg.ttt_batch_size, cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases)
    return sorted({batch_slots(len(b), cfg.ttt_batch_size, True) for b in plan.queue})


def score_rows(nll: Tensor, rows: Rows, ev: object, luts: tuple[Tensor, ...], nll_out: Tensor | None = None,
               hits_out: Tensor | None = None) -> Tensor:
    """float64 (nll, targets, bytes) of the scored positions (rows on nll's device), bytes from the byte sidecar or
    the LUTs as in train_gpt.score_windows; per-target outputs for tools/check_legality.py."""
    m = rows.score
    nbytes = target_bytes(rows.x, rows.y, luts) if ev.val_bytes is None else \
        ev.val_bytes[(rows.target + 1).cpu()].to(nll.device)
    nll = nll.double()
    if nll_out is not None or hits_out is not None:
        t = rows.target[m].cpu()
        if nll_out is not None:
            nll_out[t] = nll[m].cpu()
        if hits_out is not None:
            hits_out.index_add_(0, t, torch.ones(len(t), dtype=hits_out.dtype))
    return torch.stack((nll[m].sum(), m.sum().double(), nbytes[m].double().sum()))


def ttt_step(logits_fn: Callable, lora: nn.Module, opt: torch.optim.Optimizer, rows: Rows, ev: object,
             luts: tuple[Tensor, ...], nll_out: Tensor | None = None, hits_out: Tensor | None = None) -> Tensor:
    """Score, then adapt: the chunk's losses enter the sums from this forward, before the one AdamW step on the
    mean loss of each document's chunk (summed over documents) that this same forward's graph gives (record N)."""
    train = bool(rows.train.any())  # on the host, before the rows move to the device
    rows = Rows(*(t.to(ev.device) for t in (rows.x, rows.y, rows.target, rows.score, rows.train)))
    with torch.enable_grad(), ev.amp():  # also on a last chunk: one grad mode, so one compiled variant per shape
        logits = logits_fn(rows.x, lora)
    nll = F.cross_entropy(logits.float().flatten(0, 1), rows.y.flatten(), reduction="none").view_as(rows.y)
    sums = score_rows(nll.detach(), rows, ev, luts, nll_out, hits_out)
    if train:
        w = rows.train.float()
        opt.zero_grad(set_to_none=True)
        ((nll * w).sum(1) / w.sum(1).clamp(min=1)).sum().backward()
        opt.step()
    return sums


def run_batch(logits_fn: Callable, lora: nn.Module, slots: int, tokens: Tensor, docs: list[tuple[int, int]],
              cfg: object, ev: object, luts: tuple[Tensor, ...], nll_out: Tensor | None = None,
              hits_out: Tensor | None = None) -> Tensor:
    """One batch of documents in `slots` rows, chunk by chunk (ttt_step), with a new AdamW on the adapters (record
    N's settings: its optimizer state is reset for every batch)."""
    opt = torch.optim.AdamW(lora.parameters(), lr=cfg.ttt_lora_lr, betas=(cfg.ttt_beta1, cfg.ttt_beta2), eps=1e-10,
                            weight_decay=cfg.ttt_weight_decay)
    pad = slots - len(docs)
    starts = torch.tensor([s for s, _ in docs] + [0] * pad)
    preds = torch.tensor([n - 1 for _, n in docs] + [0] * pad)
    sums = torch.zeros(3, dtype=torch.float64, device=ev.device)
    C, W = cfg.ttt_chunk_size, cfg.ttt_eval_seq_len
    for ci in range(-(-int(preds.max()) // C)):
        rows = chunk_rows(tokens, starts, preds, ci, C, W, context(ci, C, W, ev.static_shapes))
        sums += ttt_step(logits_fn, lora, opt, rows, ev, luts, nll_out, hits_out)
    return sums


def global_sgd(model: nn.Module, toks: Tensor, cfg: object, ev: object) -> None:
    """Record N's global TTT phase: one epoch of full-parameter SGD (momentum GLOBAL_TTT_MOMENTUM) on the base model
    over toks, in chunks of GLOBAL_TTT_CHUNK_TOKENS cut into EVAL_SEQ_LEN rows that the ranks share. One step per
    chunk on the mean loss of all its rows (summed gradients over ranks), clipped to norm 1.0, lr
    GLOBAL_TTT_LR * cosine over the chunks; the last chunk is skipped."""
    L, C = cfg.eval_seq_len, cfg.global_ttt_chunk_tokens
    num_chunks, rows = -(-(toks.numel() - 1) // C), C // L
    lo, hi = rows * ev.rank // ev.world_size, rows * (ev.rank + 1) // ev.world_size
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=cfg.global_ttt_lr, momentum=cfg.global_ttt_momentum)
    for ci in range(num_chunks - 1):
        for group in opt.param_groups:
            group["lr"] = cfg.global_ttt_lr * 0.5 * (1 + math.cos(math.pi * ci / max(num_chunks - 1, 1)))
        idx = ci * C + torch.arange(lo * L, hi * L).view(-1, L)
        x, y = toks[idx].to(ev.device), toks[idx + 1].to(ev.device)
        with torch.enable_grad(), ev.amp():
            loss = model(x, y) * (hi - lo) / rows if hi > lo else sum(p.sum() for p in params) * 0.0
        loss.backward()
        if dist.is_available() and dist.is_initialized():
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def adapter_seed(seed: int, phase: int, key: int) -> torch.Generator:
    """The generator of one adapter set's A: a function of (SEED, phase, lane) only, so equal on any world size."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, phase, key]).generate_state(1)[0]))


def eval_phased_ttt(model: nn.Module, tokens: Tensor, cfg: object, ev: object, make_adapters: Callable,
                    logits_fn: Callable | None = None, log: Callable[..., None] | None = None,
                    nll_out: Tensor | None = None, hits_out: Tensor | None = None) -> tuple[float, float]:
    """(val_loss, val_bpb) of record N's phased score-first TTT over every target of tokens exactly once (module
    docstring). make_adapters(bsz, generator) builds train_gpt.TTTAdapters for the model; logits_fn(ids, lora) is
    the (compiled) model.forward_logits; log(kind, **values) writes a train_gpt.LOG_FORMATS line. The model's weights
    change (the global phases); its parameters' requires_grad is left True."""
    logits_fn, log, t0 = logits_fn or model.forward_logits, log or (lambda kind, **values: None), time.perf_counter()
    plan = make_plan(tokens, cfg.ttt_batch_size, cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases)
    bounds, n = plan.boundaries, tokens.numel() - 1
    prefix = bounds[-1] if bounds else 0
    log("ttt_start", docs=len(plan.docs), prefix=prefix, suffix=len(plan.docs) - prefix, phases=len(bounds),
        boundaries=bounds)
    luts = tuple(t.to(ev.device) for t in ev.luts)
    sums = torch.zeros(3, dtype=torch.float64, device=ev.device)
    rank = {d: i for i, d in enumerate(plan.order)}
    lanes: dict[int, nn.Module] = {}
    scored: list[int] = []  # length ranks of the scored documents
    phase = 0
    model.requires_grad_(False)
    for r0 in range(0, len(plan.queue), cfg.ttt_lanes):
        for q in range(r0, min(r0 + cfg.ttt_lanes, len(plan.queue))):
            lane, batch = q - r0, plan.queue[q]
            if lane % ev.world_size != ev.rank:
                continue
            slots = batch_slots(len(batch), cfg.ttt_batch_size, ev.static_shapes)
            if len(batch) < cfg.ttt_batch_size:  # a short batch gets fresh adapters (record N)
                lora = make_adapters(slots, adapter_seed(cfg.seed, phase, cfg.ttt_lanes + q))
            else:
                if lane not in lanes:
                    lanes[lane] = make_adapters(slots, adapter_seed(cfg.seed, phase, lane))
                lora = lanes[lane]
                lora.reset()
            sums += run_batch(logits_fn, lora, slots, tokens, [plan.docs[d] for d in batch], cfg, ev, luts, nll_out,
                              hits_out)
        scored += [rank[d] for b in plan.queue[r0 : r0 + cfg.ttt_lanes] for d in b]
        if phase < len(bounds) and len(scored) >= bounds[phase]:
            chosen = [plan.docs[plan.order[r]] for r in sorted(scored)[: bounds[phase]]]
            log("ttt_phase", k=phase + 1, phases=len(bounds), scored=len(scored), docs=len(chosen),
                seconds=time.perf_counter() - t0)
            model.requires_grad_(True)
            global_sgd(model, torch.cat([tokens[s : s + m] for s, m in chosen] or [tokens[:0]]), cfg, ev)
            model.requires_grad_(False)
            lanes, phase = {}, phase + 1
    model.requires_grad_(True)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    if int(sums[1]) != n:
        raise RuntimeError(f"phased TTT scored {int(sums[1])} targets, expected each of {n} exactly once")
    nll, count, nbytes = (float(v) for v in sums)
    return nll / count, nll / math.log(2) / nbytes


def processing_order(tokens: Tensor, cfg: object) -> Tensor:
    """Every target index in the order the phased TTT scores it: batch in the queue, chunk, document slot,
    position. Every score depends only on targets earlier in this order (module docstring)."""
    plan, out = make_plan(tokens, cfg.ttt_batch_size, cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases), []
    C, W = cfg.ttt_chunk_size, cfg.ttt_eval_seq_len
    for batch in plan.queue:
        starts = torch.tensor([plan.docs[d][0] for d in batch])
        preds = torch.tensor([plan.docs[d][1] - 1 for d in batch])
        for ci in range(-(-int(preds.max()) // C)):
            rows = chunk_rows(tokens, starts, preds, ci, C, W, context(ci, C, W, False))
            out.append(rows.target[rows.score])
    return torch.cat(out)
