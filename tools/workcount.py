"""Count the work of the real trainer code: FLOPs and HBM bytes of every kernel a step launches.

The trainer's own functions (train_gpt.GPT, Optimizers, train_step, score_windows) run on the meta
device at their real shapes, under a dispatch mode that records every aten op: its FLOPs (torch's FLOP counter
registry, the numbers `torch.utils.flop_counter.FlopCounterMode` reports), the bytes it reads and writes, and the
kernel family it belongs to. Nothing is allocated, so an 8xH100 batch traces in a second or two on a laptop.
See docs/planner.md for how the planner turns these counts into seconds.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

import train_gpt
from data.shards import target_bytes

META = torch.device("meta")
MATMUL_OPS = {"aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm"}
# Kernel families. matmul and attention are library kernels (cuBLAS, FlashAttention); everything else is
# elementwise/reduction work that torch.compile fuses. The elementwise work is split by where it happens, because
# record N's fused kernels remove exactly these parts: "logits" (softcap + cross-entropy over the vocab),
# "mlp_act" (the MLP activation), "other" (norms, RoPE, residual mixes, ...), "optimizer" (the optimizer step, EMA,
# gradient clipping: eager, one kernel per op), "streaming" (single-pass kernels added by feature factors).
FAMILIES = ("matmul", "attention", "logits", "mlp_act", "other", "optimizer", "streaming")


@dataclass
class Op:
    family: str
    flops: float
    bytes: float
    seq: int = 0  # attention only: the sequence (segment) length the kernel runs at
    backward: bool = False  # attention only
    eager_bytes: float = 0.0  # what the op moves run alone (eager); `bytes` is its share under fusion


@dataclass
class Work:
    """Every kernel-level op of one traced piece of work, with totals per family."""

    ops: list[Op] = field(default_factory=list)
    flop_counter_total: float = 0.0  # FlopCounterMode's own total for the same region (cross-check)

    def total(self, family: str | None = None, what: str = "flops") -> float:
        return sum(getattr(o, what) for o in self.ops if family is None or o.family == family)

    def count(self, family: str | None = None) -> int:
        return sum(1 for o in self.ops if family is None or o.family == family)

    def __add__(self, other: Work) -> Work:
        return Work(self.ops + other.ops, self.flop_counter_total + other.flop_counter_total)


# -----------------------------------------------------------------------------
# attention as one opaque kernel (the FlashAttention call), with causal and document-isolated FLOPs
# -----------------------------------------------------------------------------


def _attention_kernel(name: str) -> Callable[..., torch.Tensor]:
    """An opaque attention op (forward and backward kernels) that exists only to be traced on the meta device."""

    @torch.library.custom_op(f"pgolf_planner::{name}", mutates_args=())
    def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"pgolf_planner::{name} exists for meta-device tracing only")

    @fwd.register_fake
    def _(q, k, v):
        return torch.empty_like(q)

    @torch.library.custom_op(f"pgolf_planner::{name}_bwd", mutates_args=())
    def bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise RuntimeError(f"pgolf_planner::{name}_bwd exists for meta-device tracing only")

    @bwd.register_fake
    def _(q, k, v, o, g):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs, output)

    def backward(ctx, g):
        q, k, v, o = ctx.saved_tensors
        return bwd(q, k, v, o, g)

    fwd.register_autograd(backward, setup_context=setup)
    return fwd


# flash_attn: dense causal over each row (flash_attn_func); flash_attn_docs: documents isolated (the varlen call)
_flash_attn, _flash_attn_docs = _attention_kernel("flash_attn"), _attention_kernel("flash_attn_docs")


@dataclass(frozen=True)
class AttentionShape:
    """How many (query, key) pairs a document-isolated causal kernel visits per row of length T, and at what
    segment length it runs. The document boundaries are data (the BOS positions of the batch), which a meta-device
    trace does not have, so the planner derives them from a document-length distribution (planner.doc_attention).
    The default is one document per row: dense causal, T(T+1)/2 pairs at T."""

    pairs_per_token: float | None = None  # None = dense causal over the whole sequence
    segment_len: int | None = None

    def pairs(self, T: int) -> float:
        return T * (T + 1) / 2 if self.pairs_per_token is None else T * self.pairs_per_token

    def seq(self, T: int) -> int:
        return T if self.segment_len is None else min(T, self.segment_len)


# -----------------------------------------------------------------------------
# the recorder
# -----------------------------------------------------------------------------


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    n = t.numel() * t.element_size()
    try:  # a broadcast (expanded) tensor is read from its small storage
        return min(n, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return n


def _key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):
        return id(t)


FUSIBLE = ("logits", "mlp_act", "other")


class _Recorder(TorchDispatchMode):
    """Records ops; `finish()` prices the bytes of the fusible (elementwise/reduction) ops as torch.compile's fused
    kernels would move them: a tensor passed from one fusible op to another within the same phase (forward,
    backward, optimizer) never touches HBM; a fusible op reads each outside tensor (a matmul/attention output, a
    parameter, an activation saved by the forward) once per phase and writes only what leaves its phase or feeds a
    library kernel. Library kernels (matmul, attention) read and write all their operands."""

    def __init__(self, attn: AttentionShape, hidden: int, region: str = "body"):
        super().__init__()
        self.ops: list[Op] = []
        self.attn, self.hidden, self.region, self.phase = attn, hidden, region, "forward"
        self._events: list[tuple[Op, list[tuple[int, int]], list[tuple[int, int]], str]] = []
        self._alive: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket)
        if func.is_view or name in ("aten.detach", "aten.lift_fresh", "aten._local_scalar_dense", "aten.empty",
                                    "aten.empty_like", "aten.empty_strided", "aten.new_empty"):
            return out
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        self._alive += ins + outs  # keep storages alive while tracing so their identities are never reused
        written = outs or (ins[:1] if not isinstance(args[0], (list, tuple)) else _tensors(args[0]))
        reads = [(_key(t), _nbytes(t)) for t in ins]
        writes = [(_key(t), _nbytes(t)) for t in written]
        eager = sum(n for _, n in reads) + sum(n for _, n in writes)
        if name.startswith("pgolf_planner.flash_attn"):
            B, T, H, D = args[0].shape
            shape = self.attn if name.startswith("pgolf_planner.flash_attn_docs") else AttentionShape()
            fwd = 4.0 * B * H * D * shape.pairs(T)
            bwd = name.endswith("_bwd")
            op = Op("attention", 2.5 * fwd if bwd else fwd, eager, shape.seq(T), bwd)
        else:
            packet = func.overloadpacket
            flops = float(flop_registry[packet](*args, **kwargs, out_val=out)) if packet in flop_registry else 0.0
            if name in MATMUL_OPS:
                family = "matmul"
            elif self.region in ("head", "optimizer"):
                family = "logits" if self.region == "head" else "optimizer"
            else:
                family = "mlp_act" if any(t.dim() and t.shape[-1] == self.hidden and t.is_floating_point()
                                          for t in ins + outs) else "other"
            op = Op(family, flops, eager)
        op.eager_bytes = eager
        self._events.append((op, reads, writes, self.phase))
        return out

    def finish(self) -> list[Op]:
        producer: dict[int, tuple[int, str]] = {}  # storage -> (event index, phase) of its last fusible writer
        closure: dict[int, dict[int, int]] = {}  # fusible event -> outside tensors it is computed from (key: bytes)
        needed: set[int] = set()  # fusible event indexes whose output must reach HBM
        read_once: set[tuple[int, str]] = set()
        consumed: set[int] = set()

        def read(op: Op, key: int, n: int, phase: str) -> None:
            if (key, phase) not in read_once:
                read_once.add((key, phase))
                op.bytes += n

        for i, (op, reads, writes, phase) in enumerate(self._events):
            fusible = op.family in FUSIBLE
            if fusible:
                op.bytes, closure[i] = 0.0, {}
            for key, n in reads:
                src = producer.get(key)
                if src is None:  # an outside tensor: a library kernel's output, a parameter, an input
                    if fusible:
                        read(op, key, n, phase)
                        closure[i][key] = n
                    continue
                j, src_phase = src
                consumed.add(j)
                if fusible and src_phase == phase:  # fused: stays in registers
                    closure[i].update(closure[j])
                elif fusible and sum(closure[j].values()) <= n and len(closure[j]) <= 3:
                    for k2, n2 in closure[j].items():  # a later phase recomputes a cheap forward value from its
                        read(op, k2, n2, phase)  # inputs instead of saving it (the min-cut partitioner's choice)
                        closure[i][k2] = n2
                else:  # leaves its fused kernel: a library kernel or a later phase reads it from HBM
                    needed.add(j)
                    if fusible:
                        read(op, key, n, phase)
                        closure[i][key] = n
            for key, _ in writes:
                if fusible:
                    producer[key] = (i, phase)
                else:
                    producer.pop(key, None)
        final = {j for j, (_, _, _, ph) in enumerate(self._events) if j in closure and j not in consumed
                 and ph != "forward"}  # results nobody reads again: gradients, optimizer updates
        for i, (op, _, writes, _) in enumerate(self._events):
            if op.family in FUSIBLE and (i in needed or i in final):
                op.bytes += sum(n for _, n in writes)
        self.ops = [e[0] for e in self._events]
        self._alive.clear()
        return self.ops


_NO_DOCS = train_gpt.Docs()


def _attention_standin(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fa3: Callable | None = None,
                       docs: train_gpt.Docs = _NO_DOCS) -> torch.Tensor:
    """train_gpt.attention's signature; one opaque kernel: dense causal, or document-isolated when the forward built
    document boundaries (doc_mask's cu_seqlens, or its SDPA mask)."""
    isolated = docs.cu_seqlens is not None or docs.mask is not None
    return (_flash_attn_docs if isolated else _flash_attn)(q, k, v)


def _fa3_standin(*args: object, **kwargs: object) -> torch.Tensor:
    raise RuntimeError("the planner's FlashAttention-3 stand-in is never called (attention is replaced while tracing)")


_fa3_standin.varlen = _fa3_standin  # the varlen entry point train_gpt.attention would call


@contextlib.contextmanager
def _attention_as_kernel() -> Iterator[None]:
    """Route train_gpt's attention through the opaque planner kernel while tracing."""
    real = train_gpt.attention
    train_gpt.attention = _attention_standin
    try:
        yield
    finally:
        train_gpt.attention = real


class _GlobalOnly:
    """FlopCounterMode's module tracker reduced to the one 'Global' total the cross-check reads. torch's
    ModuleTracker registers an autograd hook on every module input that requires grad; a view of a parameter taken
    under no_grad (train_gpt indexes parallel_resid_lambdas[i] for each Block call, and score_windows runs under
    no_grad) requires grad but has no grad_fn, and register_multi_grad_hook raises "Expected gradient function to
    be set". The trainer never runs the tracker; only this cross-check does."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *args: object) -> None:
        return None


def _hidden(cfg: train_gpt.Config) -> int:
    return int(cfg.mlp_mult * cfg.model_dim)


def meta_model(cfg: train_gpt.Config, looping: bool, dtype: torch.dtype = torch.bfloat16) -> train_gpt.GPT:
    """train_gpt.GPT(cfg) on the meta device, built as on 8xH100 (FlashAttention-3: document isolation goes through
    doc_mask's cu_seqlens, not the CPU path's (B, 1, T, T) SDPA mask). bf16 stands in for the trainer's bf16
    autocast (autocast does not act on meta tensors): activations, and so their bytes, are bf16 as on the GPU."""
    with torch.device(META):
        model = train_gpt.GPT(cfg, fa3=_fa3_standin).to(dtype)
    model.looping = looping and cfg.num_loops > 0
    return model


def _split_head(model: train_gpt.GPT, rec: _Recorder) -> None:
    """Mark ops after forward_hidden (and, in backward, before the hidden states' gradient) as the head region."""
    inner = model.forward_hidden

    def forward_hidden(ids, lora=None):
        h = inner(ids, lora)
        rec.region = "head"
        if h.requires_grad:
            h.register_hook(lambda g: setattr(rec, "region", "body"))
        return h

    model.forward_hidden = forward_hidden


def trace(fn: Callable[[_Recorder], None], attn: AttentionShape, hidden: int) -> Work:
    """Run fn under the recorder (and FlopCounterMode for the cross-check)."""
    from torch.utils.flop_counter import FlopCounterMode

    rec = _Recorder(attn, hidden)
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with _attention_as_kernel(), counter, rec:
        fn(rec)
    return Work(rec.finish(), float(counter.get_total_flops()))


def trace_train_step(cfg: train_gpt.Config, batch_seqs: int, looping: bool, attn: AttentionShape = AttentionShape(),
                     weight_grads: bool = True) -> Work:
    """Forward + backward of model(x, y) for `batch_seqs` sequences of TRAIN_SEQ_LEN (one rank's micro-batch).
    attn: the document shape priced for document-isolated attention calls (DOC_ISOLATION=1).
    weight_grads=False freezes the weights (gradients flow to the embedding output only): the backward of an
    adapter-only TTT step, which needs dX through every layer but no weight gradients."""
    model = meta_model(cfg, looping)
    if not weight_grads:
        for name, p in model.named_parameters():
            p.requires_grad_(name == "tok_emb.weight")
    ids = torch.zeros(batch_seqs, cfg.train_seq_len, dtype=torch.long, device=META)

    def run(rec: _Recorder) -> None:
        _split_head(model, rec)
        loss = model(ids, ids)
        rec.phase = "backward"
        loss.backward()

    return trace(run, attn, _hidden(cfg))


def trace_optimizer_step(cfg: train_gpt.Config, rank: int, world_size: int, ema: bool = True) -> Work:
    """The trainer's optimizer step on one rank: grad clipping, Muon (this rank's share of Newton-Schulz, then every
    update applied), AdamW, and the EMA update, with fp32 parameters and bf16 Newton-Schulz as on the GPU."""
    with torch.device(META):
        model = train_gpt.GPT(cfg)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opts = train_gpt.Optimizers(model, cfg, rank, world_size, torch.bfloat16)
    params = list(model.parameters())
    ema_state = [p.detach().clone() for p in params]

    def run(rec: _Recorder) -> None:
        rec.region = rec.phase = "optimizer"
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm)
        opts.step()
        if ema:
            train_gpt.ema_update_(ema_state, params, cfg.ema_decay)

    return trace(run, AttentionShape(), _hidden(cfg))


def trace_score_batch(cfg: train_gpt.Config, batch_windows: int, attn: AttentionShape = AttentionShape()) -> Work:
    """One batch of train_gpt.score_windows (sliding-window scoring) with the looped model: forward, fp32
    cross-entropy per token, masks and byte counts. attn: the document shape of document-isolated windows."""
    model = meta_model(cfg, looping=True).eval()
    L, S = cfg.eval_seq_len, cfg.eval_stride
    n = L + batch_windows * S + 1
    tokens = torch.zeros(n + 1, dtype=torch.int64)
    starts = np.arange(S, S + batch_windows * S, S, dtype=np.int64)[:batch_windows]
    luts = (torch.zeros(cfg.vocab_size, dtype=torch.int16), torch.zeros(cfg.vocab_size, dtype=torch.bool),
            torch.ones(cfg.vocab_size, dtype=torch.bool))

    def run(rec: _Recorder) -> None:
        _split_head(model, rec)
        train_gpt.score_windows(model.forward_logits, tokens, starts, L, S,
                                train_gpt.EvalContext(luts, batch_windows, META))

    return trace(run, attn, _hidden(cfg))


def chunk_sgd_epoch(model: train_gpt.GPT, opt: torch.optim.Optimizer, tokens: torch.Tensor, chunk: int,
                    chunk_tokens: int, seq_len: int, rank: int, world_size: int, device: torch.device,
                    batch_seqs: int = 32) -> None:
    """One epoch of full-model SGD on chunk `chunk` of tokens, as record P's score-first TTT adapts on a chunk (pgolf ran
    it as train_gpt.adapt_on_chunk until the phased TTT replaced it; kept here op for op, since the planner's HOST_OP
    is fitted on P's TTT eval): this rank's share of the chunk's sequences in batches of batch_seqs, each batch a
    forward + backward, gradient all-reduce (none in one process), clipping to 1.0 and one SGD step."""
    n_seq = chunk_tokens // seq_len
    lo, hi = n_seq * rank // world_size, n_seq * (rank + 1) // world_size
    idx = chunk * chunk_tokens + torch.arange(lo * seq_len, hi * seq_len).view(-1, seq_len)
    x, y = tokens[idx].to(device), tokens[idx + 1].to(device)
    steps = math.ceil(math.ceil(n_seq / world_size) / batch_seqs)  # the same number of steps on every rank
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for i in range(steps):
        xb, yb = x[i * batch_seqs : (i + 1) * batch_seqs], y[i * batch_seqs : (i + 1) * batch_seqs]
        if len(xb):
            model(xb, yb).backward()
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def trace_ttt_adapt_step(cfg: train_gpt.Config, rank: int, world_size: int, chunk_tokens: int,
                         attn: AttentionShape = AttentionShape()) -> Work:
    """One epoch of chunk_sgd_epoch on one rank (record P's TTT adapt step on a chunk; record N's global TTT phases
    take the same step per chunk): eager forward + backward, clipping, SGD (momentum 0.9)."""
    model = meta_model(cfg, looping=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
    tokens = torch.zeros(chunk_tokens + 1, dtype=torch.int64)

    def run(rec: _Recorder) -> None:
        _split_head(model, rec)
        chunk_sgd_epoch(model, opt, tokens, 0, chunk_tokens, cfg.eval_seq_len, rank, world_size, META)

    return trace(run, attn, _hidden(cfg))


def _masked_sums(nll: torch.Tensor, rows: object, ev: object, luts: tuple[torch.Tensor, ...], *args: object) -> torch.Tensor:
    """phased_ttt.score_rows without boolean indexing (its output size is data, which the meta device lacks): the
    same reads of the losses and byte counts, summed under the score mask."""
    m = rows.score.to(nll.dtype)
    nbytes = target_bytes(rows.x, rows.y, luts).to(nll.dtype)
    return torch.stack(((nll * m).sum(), m.sum(), (nbytes * m).sum())).double()


def trace_ttt_step(cfg: train_gpt.Config, bsz: int, ctx: int, adapter_dtype: torch.dtype = torch.bfloat16) -> Work:
    """One step of the phased TTT as evals.phased_ttt.ttt_step runs it: the LoRA forward of `bsz` document rows of
    `ctx` tokens (train_gpt.TTTAdapters on every pass and the head), the per-token cross-entropy, the backward to
    the adapters through the frozen looped model, and the AdamW step on the adapters (region 'optimizer'). One
    document per row, so attention is dense causal. The adapters are traced in bf16 (autocast runs their matmuls
    in bf16 on the GPU; only the optimizer's fp32 state is undercounted, a few MB)."""
    from evals import phased_ttt

    model = meta_model(cfg, looping=True).eval().requires_grad_(False)
    with torch.device(META):
        lora = train_gpt.TTTAdapters(model, bsz, cfg.ttt_lora_rank, cfg.ttt_lora_alpha, None).to(adapter_dtype)
    opt = torch.optim.AdamW(lora.parameters(), lr=cfg.ttt_lora_lr, betas=(cfg.ttt_beta1, cfg.ttt_beta2), eps=1e-10,
                            weight_decay=cfg.ttt_weight_decay, foreach=True)
    luts = (torch.zeros(cfg.vocab_size, dtype=torch.int16, device=META),
            torch.zeros(cfg.vocab_size, dtype=torch.bool, device=META),
            torch.ones(cfg.vocab_size, dtype=torch.bool, device=META))
    ev = train_gpt.EvalContext(luts, bsz, META)
    z = torch.zeros(bsz, ctx, dtype=torch.long)
    t = torch.ones(bsz, ctx, dtype=torch.bool)
    rows = phased_ttt.Rows(z, z, z, t, t)
    step = opt.step

    def opt_step(*args: object, **kwargs: object) -> None:
        rec.region = "optimizer"
        step(*args, **kwargs)

    opt.step = opt_step

    def run(r: _Recorder) -> None:
        nonlocal rec
        rec = r
        _split_head(model, r)
        real = phased_ttt.score_rows
        phased_ttt.score_rows = _masked_sums
        try:
            phased_ttt.ttt_step(model.forward_logits, lora, opt, rows, ev, luts)
        finally:
            phased_ttt.score_rows = real

    rec: _Recorder | None = None
    return trace(run, AttentionShape(), _hidden(cfg))


def param_groups(cfg: train_gpt.Config) -> dict[str, int]:
    """Parameter counts by optimizer role, counted on the real (meta-device) model."""
    with torch.device(META):
        model = train_gpt.GPT(cfg)
    roles = train_gpt.param_roles(model)
    out = {"muon": 0, "embed": 0, "scalar": 0, "tensors": 0, "muon_tensors": 0}
    for name, p in model.named_parameters():
        out[roles[name]] += p.numel()
        out["tensors"] += 1
        out["muon_tensors"] += roles[name] == "muon"
    return out


def packed_segments(lengths: np.ndarray, row_tokens: int, max_len: int, seed: int = 0) -> np.ndarray:
    """The segments a document-isolated attention kernel runs over: documents of these lengths (rounded, in a seeded
    random order) packed into one stream, cut into rows of row_tokens, and every piece cut each max_len tokens."""
    lens = np.maximum(1, np.rint(np.asarray(lengths, dtype=np.float64))).astype(np.int64)
    ends = np.cumsum(np.random.default_rng(seed).permutation(lens))
    cuts = np.union1d(ends, np.arange(row_tokens, ends[-1], row_tokens, dtype=np.int64))
    pieces = np.diff(cuts, prepend=0)
    full, rest = pieces // max_len, pieces % max_len
    return np.concatenate([np.full(int(full.sum()), max_len, dtype=np.int64), rest[rest > 0]])


def pairs_per_token(segments: np.ndarray) -> float:
    """Causal (query, key) pairs per token over these segments: sum s(s+1)/2 over sum s."""
    s = np.asarray(segments, dtype=np.float64)
    return float((s * (s + 1) / 2).sum() / s.sum())


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
