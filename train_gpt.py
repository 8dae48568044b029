"""pgolf train_gpt.py: the Parameter Golf record stack in one file (<= 1,500 lines, enforced by a test).

Run: `torchrun --standalone --nproc_per_node=8 train_gpt.py` (8xH100) or `--nproc_per_node=2` on CPU; config is
the record's defaults, overridden by env vars (`SEED=42 torchrun ...`). Importing this file has no side effects.

Glossary: layer = a parameter block; pass = one execution of a layer; loop = a repeated span of layers.
doc = BOS + tokens; window = an eval context; chunk = the targets of a document a TTT step scores. bits / clip_range =
2**(bits-1)-1 / clip_sigmas / scale are the quantizer's terms; rank / world_size / master are the distributed ones.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import gc
import json
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# >>> inline local modules (tools/build_record.py replaces this block with the data/shards.py, evals/ and quant/ sources)
from data.shards import BOS_ID, DocumentPackingLoader, ShuffledSequenceLoader, load_data, sha256_file, target_bytes
from evals.phased_ttt import context_sizes, eval_phased_ttt, slot_sizes
from quant import (
    ARTIFACT_CODECS,
    accumulate_hessian,
    dequantize,
    describe,
    encode_artifact,
    load_artifact,
    quantize_state_dict,
    save_artifact,
)

# <<< inline local modules

ARTIFACT_LIMIT_BYTES = 16_000_000  # decimal, code + compressed model
TIME_LIMIT_SECONDS = 600.0  # training, and separately evaluation, on 8xH100 SXM
# The log contract (docs/log_format.md): every line the tools read is written from one of these formats, and
# tools/parse_log.py builds its parsers from the same strings. Change a format here and the parser follows.
LOG_FORMATS = dict(
    source_file="source_file: {name} bytes:{n}",
    train_shards="train_shards: {n}",
    val_tokens="val_tokens: {n}",
    tokenizer="tokenizer: sha256:{sha256} vocab:{vocab}",
    val_bytes="val_bytes: source:{source} total:{total}",
    model_params="model_params:{n}",
    runtime="world_size:{world_size} grad_accum_steps:{accum} device:{device} cpus:{cpus} attention:{attention} "
            "compile:{compile} precision:{precision}",
    gptq_reserve="gptq:reserving {seconds:g}s, effective={ms:.0f}ms",
    warmup="{label}: {k}/{n}",
    val="{step}/{iterations} val_loss: {val_loss:.4f} val_bpb: {val_bpb:.4f}",
    train="{step}/{iterations} train_loss: {train_loss:.4f} train_time: {minutes:.1f}m tok/s: {tok_s:.0f}",
    layer_loop="layer_loop:enabled step:{step} frac:{frac:.3f} encoder:{encoder} decoder:{decoder}",
    stop="stopping_early: wallclock_cap train_time: {ms:.0f}ms step: {step}/{iterations}",
    peak_memory="peak memory allocated: {allocated} MiB reserved: {reserved} MiB",
    eval="{label} val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f} eval_time:{ms:.0f}ms",
    serialized_raw="Serialized model: {n} bytes",
    code_size="Code size: {n} bytes",
    gptq_collected="GPTQ:collected {n} Hessians in {seconds:.1f}s",
    gptq_cut="GPTQ:calibration stopped at {done}/{wanted} batches to end inside the {limit:g}s train budget",
    serialized="Serialized model quantized+{codec}: {n} bytes",
    total_size="Total submission size quantized+{codec}: {n} bytes",
    bytes="bytes_{part}:{n}",
    artifact="artifact: {name} sha256:{sha256}",
    ttt_start="ttt_phased: total_docs:{docs} prefix_docs:{prefix} suffix_docs:{suffix} num_phases:{phases} "
              "boundaries:{boundaries}",
    ttt_phase="ttpp: phase:{k}/{phases} pd:{scored} gd:{docs} t:{seconds:.1f}s",
    ledger="time_ledger phase:{phase} seconds:{seconds:.3f} budget:{budget}",
    ledger_total="time_ledger_total train:{train:.3f} eval:{eval:.3f} limit:{limit:g}",
)


def log_line(kind: str, **values: object) -> str:
    return LOG_FORMATS[kind].format(**values)

# -----------------------------------------------------------------------------
# CONFIG: one frozen dataclass; env vars override (upper-case names). Model and training defaults are record N
# (PR #1855, 1.0614); configs/record_p.env gives record P (PR #1493, 1.0810).
# -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    # data and outputs
    data_dir: str = "./data/"
    data_path: str = ""  # dataset dir with fineweb_{train,val}_*.bin; "" = DATA_DIR/datasets/fineweb10B_sp{VOCAB_SIZE}
    tokenizer_path: str = ""  # "" = DATA_DIR/tokenizers/fineweb_{VOCAB_SIZE}_bpe.model
    out_dir: str = "."  # logs/, final_model.pt, final_model.int6.ptz, run_summary.json
    run_id: str = ""  # "" = a fresh uuid4
    seed: int = 1337  # init, data order (with rank) and TTT randomness
    # model shape (11L x 512d, 8 heads / 4 KV heads, MLP 4x, vocab 8192 -> 35,945,671 params; P: 35,944,536)
    vocab_size: int = 8192
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 4.0
    mlp_leaky_slope: float = 0.5  # LeakyReLU(0.5)^2 (PR #549); 0.0 gives the baseline's relu^2
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    rope_dims: int = 16  # partial RoPE: rotate the first 16 of 64 head dims
    qk_gain_init: float = 5.0  # QK-gain (PR #1493 uses 5.25)
    xsa_last_n: int = 11  # XSA on the last n layers (11 = all)
    ln_scale: bool = True  # 1/sqrt(layer+1) on every block input norm
    skip_gates_enabled: bool = True  # sigmoid-gated U-Net skips; off = the baseline's additive skips
    num_loops: int = 2  # depth recurrence: layers loop_start..loop_end run num_loops+1 times
    loop_start: int = 3
    loop_end: int = 5
    enable_looping_at: float = 0.35  # fraction of the train budget after which looping switches on
    parallel_residual_start: int = 8  # parallel attn+MLP from this physical layer on (upstream: PARALLEL_START_LAYER)
    parallel_lanes: int = 2  # 2: two residual lanes mixed by learned lambdas (record N); 1: one lane, GPT-J (P)
    smear_gate_enabled: bool = True  # SmearGate with the BOS fix
    sparse_attn_gate_enabled: bool = True  # per-head sigmoid gate on the attention output
    sparse_attn_gate_scale: float = 1.0
    doc_isolation: bool = True  # attention never crosses a BOS: documents are isolated in every forward
    # optimization
    iterations: int = 20000
    train_batch_tokens: int = 786_432
    train_seq_len: int = 2048
    grad_accum_steps: int = 0  # 0 = 8 // world_size (upstream), so the global batch is the same on 1-8 ranks
    max_wallclock_seconds: float = 600.0  # 0 = no cap (step-based schedule)
    gptq_reserve_seconds: float = 8.0  # Hessian collection must end inside the 600 s train budget
    train_loader: str = "packed"  # packed: record N's sequential document stream; shuffled: record P's loader
    warmdown_frac: float = 0.75
    min_lr: float = 0.1  # LR floor of the warmdown, as a fraction of the peak
    warmup_steps: int = 20  # compile warm-up steps, undone afterwards
    matrix_lr: float = 0.026
    scalar_lr: float = 0.02
    tied_embed_lr: float = 0.03
    muon_momentum: float = 0.97
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_backend_steps: int = 5
    muon_ns: str = "polar"  # Newton-Schulz coefficients: polar (Polar Express, one triple per step) or quintic
    muon_wd: float = 0.095
    muon_row_normalize: bool = True  # MuonEq-R (PR #1394)
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_wd: float = 0.02
    embed_wd: float = 0.085
    grad_clip_norm: float = 0.3
    ema_decay: float = 0.9965
    train_log_every: int = 500
    val_loss_every: int = 4000  # 0 = only the final validation
    val_batch_tokens: int = 524_288
    compile: str = "auto"  # auto = torch.compile on CUDA, eager on CPU; "1" / "0" force it
    precision: str = "auto"  # auto = bf16 on CUDA (record P's dtype policy), fp32 on CPU; bf16 runs on CPU too
    attention: str = "auto"  # auto = FlashAttention-3 on CUDA when usable, else SDPA; fa3 = FA3 or an error; sdpa
    # evaluation
    eval_seq_len: int = 2048
    eval_stride: int = 64
    sliding_window_enabled: bool = True
    ttt_enabled: bool = True  # record N's phased score-first TTT with per-document LoRA (evals/phased_ttt.py)
    ttt_lora_rank: int = 96
    ttt_lora_alpha: float = 144.0  # adapters scale by alpha / rank
    ttt_lora_lr: float = 1e-4  # AdamW on the adapters
    ttt_beta1: float = 0.0
    ttt_beta2: float = 0.999
    ttt_weight_decay: float = 1.0
    ttt_chunk_size: int = 48  # targets of a document scored, then trained on, per step
    ttt_eval_seq_len: int = 2048  # a step's window: the last <= this many tokens of the document up to the chunk end
    ttt_batch_size: int = 64  # documents per batch, one adapter slot each
    ttt_lanes: int = 8  # adapter sets that carry A from batch to batch (record N: one per GPU); batch q uses q % lanes
    phased_ttt_prefix_docs: int = 2000  # global SGD phases on the base model train on up to this many scored docs
    phased_ttt_num_phases: int = 3
    global_ttt_lr: float = 1e-3
    global_ttt_momentum: float = 0.9
    global_ttt_chunk_tokens: int = 32_768
    # quantization (quant/)
    gptq_calibration_batches: int = 16
    matrix_bits: int = 6
    attn_clip_sigmas: float = 13.0  # per-role SDClip sigmas (record N): attention and MLP matrices
    mlp_clip_sigmas: float = 12.0
    embed_bits: int = 7  # int7 embeddings (record N; P: 8 bits at 20 sigmas)
    embed_clip_sigmas: float = 15.0
    lqer_enabled: bool = True  # LQER: rank-4 INT2/INT4 correction of the 3 largest GPTQ residuals (PR #1797)
    lqer_rank: int = 4
    lqer_top_k: int = 3
    lqer_asym_group: int = 64
    compressor: str = "brotli"
    passthrough_numel: int = 65_536  # float tensors with at most this many elements are stored fp16, not quantized

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"bad config: {msg}")
        need(self.model_dim % self.num_heads == 0, f"MODEL_DIM={self.model_dim} not divisible by NUM_HEADS={self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0, f"NUM_HEADS={self.num_heads} not a multiple of NUM_KV_HEADS")
        head_dim = self.model_dim // self.num_heads
        need(self.rope_dims % 2 == 0 and 0 < self.rope_dims <= head_dim,
             f"ROPE_DIMS={self.rope_dims} must be even and <= head dim {head_dim}")
        need(self.num_loops == 0 or 0 <= self.loop_start <= self.loop_end < self.num_layers,
             f"loop span {self.loop_start}..{self.loop_end} outside {self.num_layers} layers")
        need(self.train_batch_tokens % self.train_seq_len == 0, "TRAIN_BATCH_TOKENS must be a multiple of TRAIN_SEQ_LEN")
        need(self.eval_seq_len % self.eval_stride == 0 and self.eval_stride > 0, "EVAL_STRIDE must divide EVAL_SEQ_LEN")
        need(0 < self.ttt_chunk_size <= self.ttt_eval_seq_len, "TTT_CHUNK_SIZE must be in 1..TTT_EVAL_SEQ_LEN")
        need(self.global_ttt_chunk_tokens % self.eval_seq_len == 0 and self.ttt_batch_size > 0 and self.ttt_lanes > 0,
             "GLOBAL_TTT_CHUNK_TOKENS must be a multiple of EVAL_SEQ_LEN; TTT_BATCH_SIZE and TTT_LANES >= 1")
        need(self.compile in ("auto", "0", "1"), f"COMPILE={self.compile!r}: use auto, 0 or 1")
        need(self.precision in ("auto", "fp32", "bf16"), f"PRECISION={self.precision!r}: use auto, fp32 or bf16")
        need(self.attention in ("auto", "fa3", "sdpa"), f"ATTENTION={self.attention!r}: use auto, fa3 or sdpa")
        need(self.parallel_lanes in (1, 2), f"PARALLEL_LANES={self.parallel_lanes}: use 1 or 2")
        need(self.parallel_lanes == 1 or self.num_loops == 0 or self.loop_end < self.parallel_residual_start,
             "two parallel lanes need the looped layers before PARALLEL_RESIDUAL_START (a lane cannot end mid-model)")
        need(self.muon_ns in NS_COEFFS, f"MUON_NS={self.muon_ns!r}: use {' or '.join(NS_COEFFS)}")
        need(self.train_loader in ("packed", "shuffled"), f"TRAIN_LOADER={self.train_loader!r}: use packed or shuffled")
        need(self.compressor in ARTIFACT_CODECS, f"COMPRESSOR={self.compressor!r}: use {', '.join(ARTIFACT_CODECS)}")
        need(0 < self.vocab_size <= 65536, "VOCAB_SIZE must be in 1..65536 (uint16 shards)")

    @property
    def dataset_dir(self) -> Path:
        return Path(self.data_path or Path(self.data_dir) / "datasets" / f"fineweb10B_sp{self.vocab_size}")

    @property
    def tokenizer_file(self) -> Path:
        return Path(self.tokenizer_path or Path(self.data_dir) / "tokenizers" / f"fineweb_{self.vocab_size}_bpe.model")

    @classmethod
    def from_summary(cls, path: str | Path, **overrides: object) -> Config:
        """The config a run used, from its run_summary.json ("config"), with keyword overrides."""
        return cls(**{**json.loads(Path(path).read_text())["config"], **overrides})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Config from upper-case env vars (SEED=42 ...). A near-miss name (MODEL_DIMS) is an error with a hint."""
        env = os.environ if env is None else env
        fields = {f.name.upper(): f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, raw in env.items():
            if key in UPSTREAM_FIXED and _same(raw, UPSTREAM_FIXED[key][0]):
                continue
            if key in UPSTREAM_FIXED or key in UPSTREAM_REFUSED:
                why = UPSTREAM_FIXED[key][1] if key in UPSTREAM_FIXED else UPSTREAM_REFUSED[key]
                raise ValueError(f"{key}={raw}: {why}; remove it (docs/config.md)")
            name = UPSTREAM_ALIASES.get(key, key)
            if name in fields:
                kwargs[fields[name].name] = _parse_env(key, raw, fields[name].type)
            elif key not in _FOREIGN_ENV and key.replace("_", "").isupper():
                close = difflib.get_close_matches(key, [*fields, *UPSTREAM_ALIASES, *UPSTREAM_FIXED], n=1, cutoff=0.88)
                if close:
                    raise ValueError(f"unknown config env var {key}; did you mean {close[0]}?")
        return cls(**kwargs)


# Env names of upstream records (the baseline B, P, N) that are not pgolf's: aliases of fields, switches pgolf does
# not have (accepted only at the value pgolf behaves as), and features it lacks. docs/config.md tells each one's story.
UPSTREAM_ALIASES = {"PARALLEL_START_LAYER": "PARALLEL_RESIDUAL_START", "ARTIFACT_DIR": "OUT_DIR"}  # N
UPSTREAM_FIXED = {  # name: (pgolf's behaviour as that switch's value, why)
    "TIE_EMBEDDINGS": ("1", "the embedding is always tied to the output head"),
    "PARALLEL_FINAL_LANE": ("mean", "two parallel lanes always end in their mean"),
    "ROPE_YARN": ("0", "RoPE has no YaRN scaling"),
    "FUSED_CE_ENABLED": ("0", "the loss is torch's softcapped cross-entropy, no fused Triton kernel (same math)"),
    "GATE_WINDOW": ("12", "SmearGate and the sparse attention gate read 12 input dims"),
    "SPARSE_ATTN_GATE_INIT_STD": ("0", "the sparse attention gate starts at zero"),
    "ATTN_OUT_GATE_ENABLED": ("0", "the attention gates are the sparse gate only (SPARSE_ATTN_GATE_ENABLED)"),
    "GATED_ATTN_ENABLED": ("0", "the attention gates are the sparse gate only (SPARSE_ATTN_GATE_ENABLED)"),
    "GATED_ATTN_QUANT_GATE": ("0", "it quantizes the dense attention gate, which pgolf does not have"),
    "LQER_FACTOR_BITS": ("4", "LQER's B factor is INT4 (A is INT2), asymmetric"),
    "LQER_ASYM_ENABLED": ("1", "LQER's factors are always the asymmetric INT2/INT4 form"),
    **{k: (v, "pgolf's phased TTT has record N's setting of this switch only") for k, v in (
        ("TTT_GRAD_STEPS", "1"), ("TTT_K_LORA", "1"), ("TTT_MLP_LORA", "1"), ("TTT_O_LORA", "1"), ("TTT_OPTIMIZER", "adam"),
        ("TTT_WARM_START_A", "1"), ("TTT_EVAL_BATCHES", ""), ("VAL_DOC_FRACTION", "1"), ("GLOBAL_TTT_EPOCHS", "1"),
        ("GLOBAL_TTT_BATCH_SEQS", "32"), ("GLOBAL_TTT_GRAD_CLIP", "1"), ("GLOBAL_TTT_WARMUP_START_LR", "0"),
        ("GLOBAL_TTT_WARMUP_CHUNKS", "0"), ("GLOBAL_TTT_RESPECT_DOC_BOUNDARIES", "1"))},
    **dict.fromkeys(("TTT_EVAL_ONLY", "PREQUANT_ONLY"), ("0", "a run always trains, quantizes and scores")),
}
UPSTREAM_REFUSED = {
    **dict.fromkeys(("EMBED_LR", "HEAD_LR"), "pgolf ties the embedding; its rate is TIED_EMBED_LR"),
    "MATRIX_CLIP_SIGMAS": "clip sigmas are per role: ATTN_CLIP_SIGMAS and MLP_CLIP_SIGMAS",
    "CASEOPS_ENABLED": "point DATA_PATH and TOKENIZER_PATH at the CaseOps variant; bytes come from its sidecar",
}


def _same(raw: str, value: str) -> bool:
    try:
        return float(raw) == float(value)
    except ValueError:
        return raw.strip().lower() == value


_FOREIGN_ENV = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                "MASTER_PORT", "OMP_NUM_THREADS", "TORCHELASTIC_RUN_ID", "PYTHONPATH", "CUDA_VISIBLE_DEVICES"}


def _parse_env(key: str, raw: str, typ: str) -> object:
    try:
        if typ == "bool":
            if raw.strip().lower() not in ("0", "1", "true", "false"):
                raise ValueError
            return raw.strip().lower() in ("1", "true")
        return {"int": int, "float": float, "str": str}[typ](raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not a valid {typ}") from None


# -----------------------------------------------------------------------------
# DISTRIBUTED + LOGGING
# -----------------------------------------------------------------------------


def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_(t: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce; a no-op in a single process."""
    if dist_ready():
        dist.all_reduce(t, op=op)
    return t


class Logger:
    """Master-only log: console and logs/<RUN_ID>.txt. Other ranks stay silent."""

    def __init__(self, path: Path | None):
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def __call__(self, msg: str, console: bool = True) -> None:
        if self.path is None:
            return
        if console:
            print(msg, flush=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(msg + "\n")



# -----------------------------------------------------------------------------
# MODEL: 11L x 512d GPT with XSA, partial RoPE, QK-gain, depth recurrence, parallel residuals, gated U-Net skips
# -----------------------------------------------------------------------------


def rms_norm(x: Tensor) -> Tensor:
    """Parameter-free RMSNorm that returns x's dtype: CUDA autocast (torch >= 2.12) runs rms_norm in fp32, which would
    silently turn a bf16 residual stream and q/k into fp32 (and FlashAttention-3 rejects mixed q/k/v dtypes)."""
    return F.rms_norm(x, (x.size(-1),)).to(x.dtype)


def layer_schedule(num_layers: int, loop_start: int, loop_end: int, num_loops: int,
                   looping: bool) -> tuple[list[int], list[int]]:
    """Encoder and decoder layer lists. Looping repeats layers loop_start..loop_end num_loops extra times; the
    virtual sequence is split in half (depth recurrence: PR #1331/#1437). P: [0,1,2,3,4,5,3,4] / [5,3,4,5,6,...,10]."""
    seq = list(range(num_layers))
    if looping and num_loops > 0:
        span = list(range(loop_start, loop_end + 1))
        seq = seq[:loop_start] + span * (num_loops + 1) + seq[loop_end + 1 :]
    half = len(seq) // 2
    return seq[:half], seq[half:]


def rope_tables(seq_len: int, rope_dims: int, base: float, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos/sin [seq_len, rope_dims/2] in fp32 with inv_freq_j = base^(-2j/rope_dims). Computed per forward (a few
    thousand values) rather than held in buffers: a model without buffers needs no DDP buffer-sync keyword, whose
    name differs between torch versions (broadcast_buffers / forward_sync_buffers)."""
    inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32, device=device) / rope_dims)
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE on the first 2*cos.size(-1) dims of each head (x: (B, T, H, D)); the rest pass through.
    Partial RoPE: PR #1019 lineage."""
    half = cos.size(-1)
    a, b, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    c, s = cos[None, : x.size(1), None, :].to(x.dtype), sin[None, : x.size(1), None, :].to(x.dtype)
    return torch.cat((a * c + b * s, b * c - a * s, rest), dim=-1)


def xsa(y: Tensor, v: Tensor) -> Tensor:
    """Exclusive self-attention: remove from each head's output (B, T, H, D) its component along the unit value
    vector of its own token (v: (B, T, Hkv, D); head h reads KV group h // (H/Hkv))."""
    v_hat = F.normalize(v, dim=-1).repeat_interleave(y.size(2) // v.size(2), dim=2)
    return y - (y * v_hat).sum(-1, keepdim=True) * v_hat


DOC_MIN_TOKENS = 16  # a row isolates up to T / 16 documents (a static count, so attention compiles with fullgraph)


def doc_starts(ids: Tensor) -> Tensor:
    """(B, T // DOC_MIN_TOKENS) int64: the document starts of each row, ascending, padded with T. A row starts a
    document at position 0 and at every BOS. A row with more documents than that keeps its first boundaries and its
    last documents attend to each other (still causal, never across rows)."""
    B, T = ids.shape
    pos = torch.arange(T, device=ids.device).expand(B, T)
    key = torch.where((ids == BOS_ID) | (pos == 0), pos, T)
    return key.sort(dim=1).values[:, : max(1, T // DOC_MIN_TOKENS)].contiguous()


@dataclass(frozen=True)
class Docs:
    """How attention isolates documents, computed once per forward (doc_mask): for SDPA a (B, 1, T, T) boolean mask
    (causal and same document), for FlashAttention-3's varlen entry point int32 cu_seqlens over the flattened
    rows, with zero-length padding segments, and the longest possible segment. None everywhere = plain causal."""

    mask: Tensor | None = None
    cu_seqlens: Tensor | None = None
    max_len: int = 0


def doc_mask(ids: Tensor, fa3: Callable | None, enabled: bool) -> Docs:
    """Document isolation from the BOS tokens in ids: the same segments (doc_starts) for SDPA and for FA3 varlen
    (record N trains and evaluates with flash_attn_varlen_func; PR #1530 lineage)."""
    if not enabled:
        return Docs()
    B, T = ids.shape
    starts = doc_starts(ids)
    if fa3 is not None:
        flat = starts + T * torch.arange(B, device=ids.device)[:, None]
        end = torch.full((1,), B * T, dtype=flat.dtype, device=ids.device)
        return Docs(cu_seqlens=torch.cat((flat.flatten(), end)).to(torch.int32), max_len=T)
    pos = torch.arange(T, device=ids.device)
    seg = torch.searchsorted(starts, pos.expand(B, T).contiguous(), right=True)  # document index of each position
    same = seg[:, :, None] == seg[:, None, :]
    return Docs(mask=(same & (pos[None, :] <= pos[:, None]))[:, None])


def attention(q: Tensor, k: Tensor, v: Tensor, fa3: Callable | None = None, docs: Docs = Docs()) -> Tensor:
    """Causal GQA attention on (B, T, H, D) / (B, T, Hkv, D), documents isolated by `docs`: FlashAttention-3
    (flash_attn_func, or its varlen entry point with cu_seqlens) when given, else SDPA. FA3 takes q, k, v in one
    16-bit dtype: v's when it is 16-bit (bf16 under autocast), else bf16."""
    if fa3 is not None:
        dt = v.dtype if v.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if docs.cu_seqlens is None:
            out = fa3(q, k, v, causal=True)
        else:
            cu, m = docs.cu_seqlens, docs.max_len
            out = fa3.varlen(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_seqlens_q=cu, cu_seqlens_k=cu,
                             max_seqlen_q=m, max_seqlen_k=m, causal=True)
        out = out[0] if isinstance(out, tuple) else out  # some FA3 builds return (out, softmax_lse)
        return out.view_as(q)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=docs.mask,
                                       is_causal=docs.mask is None, enable_gqa=True)
    return y.transpose(1, 2)


ATTN_GATE_DIMS = SMEAR_GATE_DIMS = 12  # input dims read by the sparse attention gate and by SmearGate


def smear(x: Tensor, ids: Tensor, w: Tensor, lam: Tensor) -> Tensor:
    """SmearGate (PR #1667) with the BOS fix (PR #1851): x_t += lam * sigmoid(w . x_t[:12]) * x_{t-1} for t >= 1,
    the gate forced to 0 where token t is BOS, so no document leaks into the next one. Identity at init (w, lam = 0)."""
    g = torch.sigmoid(F.linear(x[:, 1:, :SMEAR_GATE_DIMS], w.to(x.dtype))).masked_fill(ids[:, 1:, None] == BOS_ID, 0)
    return torch.cat((x[:, :1], x[:, 1:] + lam.to(x.dtype) * g * x[:, :-1]), dim=1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, qk_gain_init: float, use_xsa: bool,
                 fa3: Callable | None = None, gate_scale: float | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.use_xsa, self.fa3, self.gate_scale = use_xsa, fa3, gate_scale
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.c_v = nn.Linear(dim, num_kv_heads * self.head_dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))  # QK-gain (PR #1493 uses 5.25)
        if gate_scale is not None:  # sparse attention output gate (PR #1787): 12 input dims per head, 0.5 at init
            self.attn_gate_w = nn.Parameter(torch.zeros(num_heads, ATTN_GATE_DIMS))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, docs: Docs = Docs(), ad: nn.ModuleDict | None = None) -> Tensor:
        """ad: this pass's TTT adapters (TTTAdapters); q, k, v and the output get ad[...](x) of the attention input."""
        B, T, _ = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        if ad is not None:
            q, k, v = q + ad["q"](x), k + ad["k"](x), v + ad["v"](x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        q = apply_partial_rope(rms_norm(q), cos, sin) * self.q_gain.to(q.dtype)[None, None, :, None]
        k = apply_partial_rope(rms_norm(k), cos, sin)
        y = attention(q, k, v, self.fa3, docs)  # (B, T, H, D)
        if self.use_xsa:  # XSA: PR #1019 lineage
            y = xsa(y, v)
        if self.gate_scale is not None:
            gate = F.linear(x[..., :ATTN_GATE_DIMS], self.attn_gate_w.to(x.dtype)) * self.gate_scale
            y = y * torch.sigmoid(gate)[..., None]
        out = self.proj(y.reshape(B, T, -1))
        return out if ad is None else out + ad["o"](x)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, leaky_slope: float):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim, bias=False)
        self.leaky_slope = leaky_slope

    def forward(self, x: Tensor, ad: nn.ModuleDict | None = None) -> Tensor:
        out = self.proj(F.leaky_relu(self.fc(x), self.leaky_slope).square())
        return out if ad is None else out + ad["mlp"](x)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer_idx: int, fa3: Callable | None = None):
        super().__init__()
        dim = cfg.model_dim
        self.attn = CausalSelfAttention(dim, cfg.num_heads, cfg.num_kv_heads, cfg.qk_gain_init,
                                        use_xsa=layer_idx >= cfg.num_layers - cfg.xsa_last_n, fa3=fa3,
                                        gate_scale=cfg.sparse_attn_gate_scale if cfg.sparse_attn_gate_enabled else None)
        self.mlp = MLP(dim, int(cfg.mlp_mult * dim), cfg.mlp_leaky_slope)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.norm_scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.ln_scale else 1.0  # physical index, kept when looped
        self.parallel = layer_idx >= cfg.parallel_residual_start  # parallel residuals: PR #1204, #1412

    def forward(self, x: Tensor, x0: Tensor, cos: Tensor, sin: Tensor, docs: Docs, lane1: Tensor | None = None,
                lambdas: tuple[Tensor, Tensor] | None = None,
                ad: nn.ModuleDict | None = None) -> tuple[Tensor, Tensor | None]:
        """x (lane 0) and lane 1 after this layer. With two lanes (record N), attention reads lane 0 (mixed with x0),
        the MLP reads lane 1, and each lane takes rho * itself + pi-weighted attention and MLP outputs. ad: the TTT
        adapters of this pass, passed to attention and MLP."""
        dt = x.dtype
        mix = self.resid_mix.to(dt)
        mixed = mix[0] * x + mix[1] * x0
        h = rms_norm(mixed) * self.norm_scale
        a = self.attn_scale.to(dt) * self.attn(h, cos, sin, docs, ad)
        if lane1 is not None:
            rho, pi = (t.to(dt) for t in lambdas)
            m = self.mlp_scale.to(dt) * self.mlp(rms_norm(lane1) * self.norm_scale, ad)
            return rho[0] * x + pi[0, 0] * a + pi[1, 0] * m, rho[1] * lane1 + pi[0, 1] * a + pi[1, 1] * m
        if self.parallel:
            return mixed + a + self.mlp_scale.to(dt) * self.mlp(h, ad), None
        x = mixed + a
        return x + self.mlp_scale.to(dt) * self.mlp(rms_norm(x) * self.norm_scale, ad), None


class GPT(nn.Module):
    """fa3: FlashAttention-3 for every attention call (see resolve_attention), None for SDPA."""

    def __init__(self, cfg: Config, fa3: Callable | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)  # tied with the output head
        self.blocks = nn.ModuleList(Block(cfg, i, fa3) for i in range(cfg.num_layers))
        enc, dec = layer_schedule(cfg.num_layers, cfg.loop_start, cfg.loop_end, cfg.num_loops, looping=True)
        self.num_skips = min(len(enc), len(dec))  # sized for the looped lists, also used unlooped
        self.skip_weights = nn.Parameter(torch.ones(self.num_skips, cfg.model_dim))
        self.skip_gates = nn.Parameter(torch.zeros(self.num_skips, cfg.model_dim)) if cfg.skip_gates_enabled else None
        if cfg.smear_gate_enabled:
            self.smear_gate = nn.Parameter(torch.zeros(1, SMEAR_GATE_DIMS))
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        if cfg.parallel_lanes == 2:  # two-lane parallel residuals (PR #1530 lineage), one row per physical layer
            self.parallel_resid_lambdas = nn.Parameter(torch.full((cfg.num_layers, 2), 1.1))
            self.parallel_post_lambdas = nn.Parameter(torch.ones(cfg.num_layers, 2, 2))
        self.fa3 = fa3
        self.looping = False  # depth recurrence switches on during training (Config.enable_looping_at)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.tok_emb.weight, std=self.cfg.tied_embed_init_std)
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear):
                if name.endswith(".proj"):  # attention and MLP output projections start at zero
                    nn.init.zeros_(mod.weight)
                elif min(mod.weight.shape) >= 64:
                    nn.init.orthogonal_(mod.weight)

    def forward_hidden(self, ids: Tensor, lora: TTTAdapters | None = None) -> Tensor:
        """Final normed hidden states (B, T, D): the input of the tied output head. lora: TTT adapters, one set per
        layer pass, added inside the same blocks (gates, SmearGate, document isolation and looping unchanged)."""
        cfg = self.cfg
        enc, dec = layer_schedule(cfg.num_layers, cfg.loop_start, cfg.loop_end, cfg.num_loops, self.looping)
        cos, sin = rope_tables(ids.size(1), cfg.rope_dims, cfg.rope_base, ids.device)
        docs = doc_mask(ids, self.fa3, cfg.doc_isolation)
        x = self.tok_emb(ids)
        if cfg.smear_gate_enabled:
            x = smear(x, ids, self.smear_gate, self.smear_lambda)
        x = rms_norm(x)
        x0, skips, lane1 = x, [], None

        def block(i: int, p: int, x: Tensor, lane1: Tensor | None) -> tuple[Tensor, Tensor | None]:
            ad = None if lora is None else lora.passes[p]
            lambdas = (self.parallel_resid_lambdas[i], self.parallel_post_lambdas[i]) if lane1 is not None else None
            return self.blocks[i](x, x0, cos, sin, docs, lane1, lambdas, ad)

        for p, i in enumerate(enc):
            if lane1 is None and cfg.parallel_lanes == 2 and self.blocks[i].parallel:
                lane1 = x  # both lanes start as the stream entering the first two-lane layer
            x, lane1 = block(i, p, x, lane1)
            skips.append(x)
        for j, i in enumerate(dec):
            if lane1 is None and cfg.parallel_lanes == 2 and self.blocks[i].parallel:
                lane1 = x  # before this layer's skip: the skip joins lane 0 only (as record N)
            if j < self.num_skips and skips:  # the U-Net skip joins lane 0
                s = self.skip_weights[j].to(x.dtype) * skips.pop()
                if self.skip_gates is None:
                    x = x + s
                else:  # sigmoid skip gates: lerp(s, x, g); init 0 -> 50/50
                    x = torch.lerp(s, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))
            x, lane1 = block(i, len(enc) + j, x, lane1)
        return rms_norm(x if lane1 is None else 0.5 * (x + lane1))

    def forward_logits(self, ids: Tensor, lora: TTTAdapters | None = None) -> Tensor:
        h = self.forward_hidden(ids, lora)
        logits = F.linear(h, self.tok_emb.weight)
        if lora is not None:  # the head's adapter, before the softcap
            logits = logits + lora.head(h)
        c = self.cfg.logit_softcap
        return c * torch.tanh(logits / c)

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        logits = self.forward_logits(ids)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class LoRA(nn.Module):
    """Record N's batched TTT adapter (BatchedLinearLoRA; alpha/rank scaling: PR #1767): slot b of dim 0 (one
    document) maps x to (x A_b^T) B_b^T * alpha/rank. A ~ U(+-1/sqrt(in)) from gen, B = 0: a new adapter adds 0."""

    def __init__(self, bsz: int, fan_in: int, fan_out: int, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        self.A = nn.Parameter(torch.empty(bsz, rank, fan_in).uniform_(-fan_in**-0.5, fan_in**-0.5, generator=gen))
        self.B = nn.Parameter(torch.zeros(bsz, fan_out, rank))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.A.transpose(1, 2)) @ self.B.transpose(1, 2) * self.scale


class TTTAdapters(nn.Module):
    """Record N's TTT LoRA for `bsz` documents: on Q, K, V, the attention output and the MLP of every layer pass (a
    looped layer gets one set per pass; parallel adapters from the attention / MLP input to its output) and on the
    head (final hidden -> logits, before the softcap). GPT.forward_logits(ids, lora) applies them."""

    def __init__(self, model: GPT, bsz: int, rank: int, alpha: float, gen: torch.Generator):
        super().__init__()
        c, d = model.cfg, model.cfg.model_dim
        kv = c.num_kv_heads * (d // c.num_heads)
        passes = sum(map(len, layer_schedule(c.num_layers, c.loop_start, c.loop_end, c.num_loops, model.looping)))
        lora = lambda fan_in, fan_out: LoRA(bsz, fan_in, fan_out, rank, alpha, gen)
        self.head = lora(d, c.vocab_size)
        self.passes = nn.ModuleList(nn.ModuleDict(dict(q=lora(d, d), k=lora(d, kv), v=lora(d, kv), o=lora(d, d),
                                                       mlp=lora(d, d))) for _ in range(passes))
        self.to(model.tok_emb.weight.device)

    def reset(self) -> None:
        """B = 0 again, A kept (record N's warm start, TTT_WARM_START_A=1)."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, LoRA):
                    m.B.zero_()


def ttt_forward(model: GPT, ids: Tensor, lora: TTTAdapters) -> Tensor:
    """The TTT forward as a frame of its own, so compiling it (Run.score) caches its shapes apart from the eval's."""
    return model.forward_logits(ids, lora)


def apply_precision(model: GPT, precision: str) -> GPT:
    """Record P's dtype policy for "bf16": the tied embedding is stored in bf16, so the residual stream is bf16; block
    matrices and control tensors stay fp32 masters; matmuls run under bf16 autocast (Runtime.amp). "fp32": all fp32."""
    model.tok_emb.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    return model


def param_roles(model: GPT) -> dict[str, str]:
    """Each parameter's optimizer role, assigned once and explicitly: 'muon' for block matrices, 'embed' for the
    tied embedding, 'scalar' for everything else (gains, scales, mixes, skip weights/gates)."""
    roles = {name: "scalar" for name, _ in model.named_parameters()}
    roles["tok_emb.weight"] = "embed"
    for name, mod in model.blocks.named_modules():
        if isinstance(mod, nn.Linear):
            roles[f"blocks.{name}.weight"] = "muon"
    return roles


def quant_roles(model: GPT) -> dict[str, str]:
    """Each matrix's quantization role (quant.ROLES), assigned once and explicitly: the tied embedding, and the
    attention and MLP matrices of every block (each role has its own bits / clip sigmas)."""
    roles = {"tok_emb.weight": "embed"}
    for name, mod in model.blocks.named_modules():
        if isinstance(mod, nn.Linear):
            roles[f"blocks.{name}.weight"] = "attn" if ".attn." in f".{name}." else "mlp"
    return roles


# -----------------------------------------------------------------------------
# OPTIMIZERS: MuonEq-R for block matrices (rank-sharded), AdamW for the embedding and scalars
# -----------------------------------------------------------------------------

NS_COEFFS = {  # (a, b, c) of each Newton-Schulz step; the last triple repeats past the table's end
    "quintic": ((3.4445, -4.7750, 2.0315),),  # Keller Jordan's Muon: every step the same
    "polar": ((8.156554524902461, -22.48329292557795, 15.878769915207462),  # Polar Express (PR #1344, #1787)
              (4.042929935166739, -2.808917465908714, 0.5000178451051316),
              (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
              (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
              (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)),
}


def zeropower_via_newtonschulz5(G: Tensor, steps: int, dtype: torch.dtype = torch.float32,
                                coeffs: tuple[tuple[float, float, float], ...] = NS_COEFFS["quintic"]) -> Tensor:
    """Approximately orthogonalize G: about U S' V^T with S'_ii near 1 rather than exactly 1, which is what a few
    fixed-coefficient steps trade for speed (the Polar Express table gets closer in 5 steps than the quintic). Runs
    in `dtype` (bf16 on GPU, fp32 on CPU)."""
    X = G.to(dtype)
    X = X / (X.norm() + 1e-7)
    transposed = X.size(0) > X.size(1)
    if transposed:
        X = X.T
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        A = X @ X.T
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.T if transposed else X


def muon_update(grad: Tensor, buf: Tensor, momentum: float, ns_steps: int, row_normalize: bool,
                dtype: torch.dtype = torch.float32, ns: Callable = zeropower_via_newtonschulz5) -> Tensor:
    """One Muon direction: Nesterov momentum (updates buf in place), MuonEq-R row normalization (PR #1394),
    Newton-Schulz (`ns`, the compiled function on GPU), and the sqrt(max(1, rows/cols)) shape scale."""
    buf.mul_(momentum).add_(grad)
    u = grad.add(buf, alpha=momentum)
    if row_normalize:
        u = u / u.float().norm(dim=1, keepdim=True).clamp_min(1e-7).to(u.dtype)
    u = ns(u, ns_steps, dtype)
    return u * max(1.0, grad.size(0) / grad.size(1)) ** 0.5


class Muon(torch.optim.Optimizer):
    """Muon over 2-D matrices. Matrix i is orthogonalized by rank i % world_size into a flat buffer (zeros
    elsewhere); one all-reduce SUM hands every rank every update; each rank applies decoupled weight decay and
    the update to all matrices. Momentum buffers live in self.state on the owning rank, so loading a saved
    optimizer state restores (or clears) them too. The exchange buffers are allocated once, not per step."""

    def __init__(self, params: list[Tensor], lr: float, momentum: float, ns_steps: int, weight_decay: float,
                 row_normalize: bool, rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32,
                 ns: Callable = zeropower_via_newtonschulz5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_steps, self.row_normalize, self.dtype, self.ns = ns_steps, row_normalize, dtype, ns
        self.rank, self.world_size = rank, world_size
        self.flat = [torch.zeros(sum(p.numel() for p in g["params"]), dtype=dtype, device=g["params"][0].device)
                     for g in self.param_groups]

    @torch.no_grad()
    def step(self) -> None:
        for group, flat in zip(self.param_groups, self.flat):
            params = group["params"]
            flat.zero_()
            offset = 0
            for i, p in enumerate(params):
                if i % self.world_size == self.rank and p.grad is not None:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.grad)
                    u = muon_update(p.grad, state["momentum_buffer"], group["momentum"], self.ns_steps,
                                    self.row_normalize, self.dtype, self.ns)
                    flat[offset : offset + p.numel()] = u.flatten()
                offset += p.numel()
            all_reduce_(flat)
            offset = 0
            for p in params:
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()


class Optimizers:
    """The three optimizers of the record with their base learning rates; one schedule drives all of them.
    AdamW is the fused kernel (record P) on CUDA and CPU; `ns` is the Newton-Schulz function Muon calls."""

    def __init__(self, model: GPT, cfg: Config, rank: int = 0, world_size: int = 1, ns_dtype: torch.dtype = torch.float32,
                 ns: Callable = zeropower_via_newtonschulz5):
        roles, named = param_roles(model), dict(model.named_parameters())
        by_role = {r: [named[n] for n, role in roles.items() if role == r] for r in ("muon", "embed", "scalar")}
        betas, fused = (cfg.beta1, cfg.beta2), named["tok_emb.weight"].device.type in ("cuda", "cpu")
        coeffs = NS_COEFFS[cfg.muon_ns]
        self.muon = Muon(by_role["muon"], cfg.matrix_lr, cfg.muon_momentum, cfg.muon_backend_steps, cfg.muon_wd,
                         cfg.muon_row_normalize, rank, world_size, ns_dtype, lambda g, k, dt: ns(g, k, dt, coeffs))
        self.embed = torch.optim.AdamW(by_role["embed"], lr=cfg.tied_embed_lr, betas=betas, eps=cfg.adam_eps,
                                       weight_decay=cfg.embed_wd, fused=fused)
        self.scalar = torch.optim.AdamW(by_role["scalar"], lr=cfg.scalar_lr, betas=betas, eps=cfg.adam_eps,
                                        weight_decay=cfg.adam_wd, fused=fused)
        self.all = [self.muon, self.embed, self.scalar]
        self.base_lrs = [cfg.matrix_lr, cfg.tied_embed_lr, cfg.scalar_lr]

    def set_schedule(self, lr_mul: float, muon_momentum: float) -> None:
        for opt, base in zip(self.all, self.base_lrs):
            for group in opt.param_groups:
                group["lr"] = base * lr_mul
        for group in self.muon.param_groups:
            group["momentum"] = muon_momentum

    def step(self) -> None:
        for opt in self.all:
            opt.step()
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> list[dict]:
        return [copy.deepcopy(opt.state_dict()) for opt in self.all]

    def load_state_dict(self, states: list[dict]) -> None:
        for opt, state in zip(self.all, states):
            opt.load_state_dict(copy.deepcopy(state))


@dataclass(frozen=True)
class Schedule:
    """Everything that moves with training progress, in one place: progress, LR multiplier, Muon momentum, the
    looping switch and the calibration deadline. Pure functions of the config."""

    cfg: Config

    @property
    def cap_ms(self) -> float:
        """The train loop's cap: the 600 s budget minus the GPTQ reserve (0 = no cap, step-based progress)."""
        c = self.cfg
        return 1000.0 * max(0.0, c.max_wallclock_seconds - c.gptq_reserve_seconds) if c.max_wallclock_seconds > 0 else 0.0

    def frac(self, step: int, elapsed_ms: float) -> float:
        return elapsed_ms / self.cap_ms if self.cap_ms > 0 else step / self.cfg.iterations

    def lr_mul(self, frac: float) -> float:
        """Flat at 1, then linear warmdown over the last warmdown_frac of training to min_lr (no LR warmup)."""
        c = self.cfg
        return 1.0 if frac < 1.0 - c.warmdown_frac else max((1.0 - frac) / c.warmdown_frac, c.min_lr)

    def muon_momentum(self, step: int) -> float:
        c = self.cfg
        k = min(step / c.muon_momentum_warmup_steps, 1.0) if c.muon_momentum_warmup_steps > 0 else 1.0
        return (1 - k) * c.muon_momentum_warmup_start + k * c.muon_momentum

    def looping(self, frac: float) -> bool:
        """Depth recurrence is on from enable_looping_at of the budget; it never switches off."""
        return self.cfg.num_loops > 0 and frac >= self.cfg.enable_looping_at

    def calibration_seconds(self, train_ms: float) -> float:
        """What is left of the train budget after a loop of train_ms: Hessian collection reads training data, so it
        must end inside the budget (upstream rulings around #677 and the #1868 rerun)."""
        return self.cfg.max_wallclock_seconds - train_ms / 1000 if self.cfg.max_wallclock_seconds > 0 else math.inf


@torch.no_grad()
def ema_update_(ema: list[Tensor], params: list[Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in fp32."""
    torch._foreach_lerp_(ema, [p.float() for p in params], 1.0 - decay)


# -----------------------------------------------------------------------------
# EVALUATION: one window scorer under plain and sliding-window evaluation; record N's phased score-first TTT is
# evals/phased_ttt.py (inlined into a record like data/shards.py), on the model's forward with TTT adapters.
#
# Targets are indexed 0..N-1 (target j is tokens[j+1], predicted from tokens[..j]). A window starting at s reads
# tokens[s : s+seq_len] and scores targets s+first .. s+wlen-1, where first = 0 for s = 0 and seq_len - stride
# otherwise. With stride = seq_len this is the plain non-overlapping eval.
# -----------------------------------------------------------------------------


def window_starts(num_targets: int, seq_len: int, stride: int) -> np.ndarray:
    """Window starts 0, stride, 2*stride, ... while start + (seq_len - stride) < num_targets (record P):
    every target is scored exactly once, each after the first seq_len with >= seq_len - stride tokens of context."""
    ctx = seq_len - stride
    return np.arange(0, max(1, num_targets - ctx), stride, dtype=np.int64)


@dataclass(frozen=True)
class EvalContext:
    """What every scorer needs besides the model and the tokens. static_shapes pads every batch to batch_windows
    rows, so a compiled forward sees one shape (no recompiles); eager runs skip the padding."""

    luts: tuple[Tensor, Tensor, Tensor]
    batch_windows: int
    device: torch.device = torch.device("cpu")
    val_bytes: Tensor | None = None  # the byte sidecar (val token i's original bytes), used instead of the LUTs
    amp: Callable = contextlib.nullcontext
    rank: int = 0
    world_size: int = 1
    static_shapes: bool = False

    def share(self, items: np.ndarray) -> np.ndarray:
        """This rank's contiguous share of items."""
        n = len(items)
        return items[n * self.rank // self.world_size : n * (self.rank + 1) // self.world_size]


def bpb_from_sums(sums: Tensor) -> tuple[float, float]:
    """(val_loss in nats/token, val_bpb) from float64 sums (nll, targets, bytes)."""
    nll, count, nbytes = (float(v) for v in sums)
    return nll / count, nll / math.log(2) / nbytes


@torch.no_grad()
def score_windows(logits_fn: Callable[[Tensor], Tensor], tokens: Tensor, starts: np.ndarray, seq_len: int,
                  stride: int, ev: EvalContext, nll_out: Tensor | None = None, hits_out: Tensor | None = None) -> Tensor:
    """float64 sums (nll, targets, bytes) over the targets these windows score. Short windows are padded to seq_len
    by repeating the last token (causal attention: padding after a position cannot change it); with static shapes,
    short batches get all-masked rows. If given, nll_out[j] receives target j's nll and hits_out[j] counts how often
    target j was scored (check_legality.py)."""
    n = tokens.numel() - 1
    ctx = seq_len - stride
    offsets = torch.arange(seq_len)
    sums = torch.zeros(3, dtype=torch.float64, device=ev.device)
    luts = tuple(t.to(ev.device) for t in ev.luts)
    for b in range(0, len(starts), ev.batch_windows):
        s = torch.from_numpy(starts[b : b + ev.batch_windows])[:, None]
        real = torch.ones(len(s), 1, dtype=torch.bool)
        if ev.static_shapes and len(s) < ev.batch_windows:
            pad = ev.batch_windows - len(s)
            s, real = torch.cat((s, s.new_zeros(pad, 1))), torch.cat((real, real.new_zeros(pad, 1)))
        pos = s + offsets  # (W, seq_len) target index of each position
        mask = (pos < n) & (pos >= torch.where(s == 0, 0, s + ctx)) & real
        x = tokens[pos.clamp(max=n - 1)].to(ev.device)
        y = tokens[(pos + 1).clamp(max=n)].to(ev.device)
        mask = mask.to(ev.device)
        with ev.amp():
            logits = logits_fn(x)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y).double()
        nll = torch.where(mask, nll, 0.0)
        nbytes = target_bytes(x, y, luts) if ev.val_bytes is None else ev.val_bytes[(pos + 1).clamp(max=n)].to(ev.device)
        sums += torch.stack((nll.sum(), mask.sum().double(), (nbytes * mask).sum().double()))
        if nll_out is not None:
            nll_out[pos[mask.cpu()]] = nll[mask].cpu()
        if hits_out is not None:
            hits_out.index_add_(0, pos[mask.cpu()], torch.ones(int(mask.sum()), dtype=hits_out.dtype))
    return sums


def evaluate(logits_fn: Callable[[Tensor], Tensor], tokens: Tensor, seq_len: int, stride: int,
             ev: EvalContext) -> tuple[float, float]:
    """Plain (stride = seq_len) or sliding-window eval; windows split contiguously over ranks, sums all-reduced."""
    starts = ev.share(window_starts(tokens.numel() - 1, seq_len, stride))
    sums = all_reduce_(score_windows(logits_fn, tokens, starts, seq_len, stride, ev))
    n = tokens.numel() - 1
    if int(sums[1]) != n:
        raise RuntimeError(f"eval scored {int(sums[1])} targets, expected each of {n} exactly once")
    return bpb_from_sums(sums)


# -----------------------------------------------------------------------------
# RUNTIME: device, precision and attention backend, chosen once per process
# -----------------------------------------------------------------------------


@dataclass
class Runtime:
    """The process's place in the run. precision "bf16" is record P's CUDA dtype policy (apply_precision + bf16
    autocast) and runs on CPU too, so CI exercises the GPU precision path; "fp32" is the fast CPU path. fa3 is
    FlashAttention-3's flash_attn_func when attention runs on it (resolve_attention), else None: SDPA."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    fa3: Callable | None = None
    attention_note: str = "sdpa"

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def attention(self) -> str:
        return "fa3" if self.fa3 is not None else "sdpa"

    @property
    def ns_dtype(self) -> torch.dtype:  # Newton-Schulz and the Muon exchange buffer
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def amp(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


@dataclass(frozen=True)
class FA3:
    """FlashAttention-3's two entry points: calling it is flash_attn_func (B, T, H, D); .varlen is
    flash_attn_varlen_func on flattened rows with cu_seqlens (document isolation)."""

    func: Callable
    varlen: Callable

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.func(*args, **kwargs)


def load_fa3(device: torch.device) -> tuple[FA3 | None, str]:
    """FA3 if `flash_attn_interface` imports and runs a tiny causal GQA call of both entry points on device, else
    (None, why). A wheel built for another torch or CUDA fails here, at import or first call, not mid-run."""
    try:
        from flash_attn_interface import flash_attn_func, flash_attn_varlen_func
        q = torch.zeros(1, 4, 2, 64, dtype=torch.bfloat16, device=device)
        flash_attn_func(q, q[:, :, :1], q[:, :, :1], causal=True)
        cu = torch.tensor([0, 1, 4], dtype=torch.int32, device=device)
        flash_attn_varlen_func(q[0], q[0, :, :1], q[0, :, :1], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4,
                               max_seqlen_k=4, causal=True)
    except Exception as e:  # ImportError, OSError/undefined symbol (ABI), RuntimeError (no kernel for this GPU)
        return None, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    return FA3(flash_attn_func, flash_attn_varlen_func), "flash_attn_interface ok"


def resolve_attention(mode: str, device: torch.device) -> tuple[Callable | None, str]:
    """ATTENTION=auto: FlashAttention-3 on CUDA when usable, else SDPA; fa3: FA3 or a hard error; sdpa: SDPA."""
    if mode == "sdpa" or (mode == "auto" and device.type != "cuda"):
        return None, "sdpa " + ("requested" if mode == "sdpa" else "(no CUDA)")
    fa3, why = load_fa3(device)
    if fa3 is None and mode == "fa3":
        raise RuntimeError(f"ATTENTION=fa3 but FlashAttention-3 is unusable: {why} (install it: requirements-gpu.txt)")
    return fa3, why


def setup_runtime(cfg: Config) -> Runtime:
    """The one place that looks at the device (and reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK): CUDA + NCCL, or
    CPU + gloo; then the precision (auto: bf16 on CUDA, fp32 on CPU) and the attention backend."""
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        backend = "nccl"
    else:
        device = torch.device("cpu")
        per_rank = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", per_rank))))  # an explicit choice wins
        backend = "gloo"
    if world_size > 1:
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    fa3, note = resolve_attention(cfg.attention, device)
    return Runtime(rank, world_size, local_rank, device, precision, fa3, note)


# -----------------------------------------------------------------------------
# TRAINING PIECES: steps, warm-up, calibration, the data a run reads
# -----------------------------------------------------------------------------


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-steps per optimizer step: GRAD_ACCUM_STEPS, else 8 // world_size (1 for 16+ ranks), so the global
    batch is the same on any world size that divides it."""
    accum = cfg.grad_accum_steps or (8 // world_size if 8 % world_size == 0 else 1)
    per_rank = cfg.train_batch_tokens / (world_size * accum)
    if per_rank != int(per_rank) or int(per_rank) % cfg.train_seq_len:
        raise ValueError(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} cannot be split over world_size={world_size} x "
                         f"grad_accum={accum} into sequences of TRAIN_SEQ_LEN={cfg.train_seq_len}")
    return accum


def train_step(model: nn.Module, opts: Optimizers, batches: list[tuple[Tensor, Tensor]], grad_clip: float,
               amp: Callable) -> Tensor:
    """One optimizer step over micro-batches (grads averaged over micro-batches, and over ranks by DDP)."""
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    total = torch.zeros((), device=batches[0][0].device)
    for i, (x, y) in enumerate(batches):
        if ddp:
            model.require_backward_grad_sync = i == len(batches) - 1
        with amp():
            loss = model(x, y)
        (loss / len(batches)).backward()
        total += loss.detach()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opts.all for grp in g.param_groups for p in grp["params"]], grad_clip)
    opts.step()
    return total / len(batches)


@torch.no_grad()
def collect_hessians(model: GPT, batches: Iterator[Tensor], min_numel: int, amp: Callable) -> tuple[dict[str, Tensor], int]:
    """Sum of X^T X per quantized matrix over calibration batches: forward hooks on every block Linear with more
    than min_numel weights, and the final hidden states for the tied embedding (GPTQ'd as the output head)."""
    hessians: dict[str, Tensor] = {}

    def hook(name: str) -> Callable:
        def fn(mod: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
            hessians[name] = accumulate_hessian(hessians.get(name), inputs[0])
        return fn

    handles = [mod.register_forward_hook(hook(f"{name}.weight")) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and mod.weight.numel() > min_numel]
    model.eval()
    count = 0
    try:
        for x in batches:
            with amp():
                h = model.forward_hidden(x)
            if model.tok_emb.weight.numel() > min_numel:
                hessians["tok_emb.weight"] = accumulate_hessian(hessians.get("tok_emb.weight"), h)
            count += 1
    finally:
        for handle in handles:
            handle.remove()
    return hessians, count


def compile_warmup(model: GPT, opts: Optimizers, step_fn: Callable[[ShuffledSequenceLoader], Tensor],
                   make_loader: Callable[[], ShuffledSequenceLoader], cfg: Config, log: Callable[[str], None]) -> None:
    """Compile warm-up (PR #1394 lineage): WARMUP_STEPS real steps with looping off, then as many with looping on,
    then weights, optimizer state (Muon momentum buffers included: an upstream bug left them dirty) and looping
    are put back exactly as they were, so the timed run starts from the initial state. The caller makes a fresh
    loader afterwards."""
    if cfg.warmup_steps <= 0:
        return
    initial_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    initial_opts = opts.state_dict()
    loader = make_loader()
    opts.set_schedule(1.0, cfg.muon_momentum_warmup_start)
    for label, looping in (("warmup_step", False), ("loop_warmup_step", True))[: 2 if cfg.num_loops > 0 else 1]:
        model.looping = looping
        if looping:
            enc, dec = layer_schedule(cfg.num_layers, cfg.loop_start, cfg.loop_end, cfg.num_loops, True)
            log(f"loop_warmup:enabled encoder:{enc} decoder:{dec}")
        for k in range(1, cfg.warmup_steps + 1):
            step_fn(loader)
            if k <= 6 or k % 10 == 0 or k == cfg.warmup_steps:
                log(log_line("warmup", label=label, k=k, n=cfg.warmup_steps))
    model.looping = False
    with torch.no_grad():
        model.load_state_dict(initial_model)
    opts.load_state_dict(initial_opts)


def load_quantized_model(path: str | Path, cfg: Config, device: torch.device, precision: str = "fp32",
                         fa3: Callable | None = None) -> GPT:
    """A fresh model with the artifact's dequantized weights, looping on, in eval mode (what every score uses)."""
    model = apply_precision(GPT(cfg, fa3).to(device), precision)
    model.load_state_dict({k: v.to(device) for k, v in dequantize(load_artifact(path)).items()}, strict=True)
    model.looping = cfg.num_loops > 0
    return model.eval()


class Ledger:
    """Time per phase and the budget it counts toward: 'train' (600 s), 'eval' (600 s) or 'none'."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, str]] = []

    def add(self, phase: str, seconds: float, budget: str) -> None:
        self.rows.append((phase, seconds, budget))

    def total(self, budget: str) -> float:
        return sum(s for _, s, b in self.rows if b == budget)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nvidia_smi() -> str:
    try:
        return subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "nvidia-smi: not available (CPU run)"


def code_sources() -> dict[str, bytes]:
    """Every code file this run executes, by repo-relative name: train_gpt.py, plus the local modules it imports
    when they are imported as modules (a repo run): data/shards.py, evals/*.py and quant/*.py with their packages'
    __init__.py. In a packed record they are inlined, so the record file is the only one. Their total is the run's
    code bytes."""
    files = {"train_gpt.py": Path(__file__).read_bytes()}
    if load_data.__module__ == "data.shards":
        data_dir = Path(sys.modules["data.shards"].__file__).parent
        files.update({f"data/{name}": (data_dir / name).read_bytes() for name in ("__init__.py", "shards.py")})
    if eval_phased_ttt.__module__ == "evals.phased_ttt":
        evals_dir = Path(sys.modules["evals"].__file__).parent
        files.update({f"evals/{p.name}": p.read_bytes() for p in sorted(evals_dir.glob("*.py"))})
    if quantize_state_dict.__module__.startswith("quant."):
        quant_dir = Path(sys.modules["quant"].__file__).parent
        files.update({f"quant/{p.name}": p.read_bytes() for p in sorted(quant_dir.glob("*.py")) if p.name != "__main__.py"})
    return files


# -----------------------------------------------------------------------------
# THE RUN: build, train, calibrate, serialize, score, summarize
# -----------------------------------------------------------------------------


class Run:
    """One run as named phases. run() calls them in order; tools reuse them on a saved checkpoint
    (Run.from_checkpoint, then calibrate / serialize / score). Building loads the data and makes the model."""

    def __init__(self, cfg: Config, rt: Runtime, log_to_file: bool = False):
        self.cfg, self.rt = cfg, rt
        self.out_dir, self.run_id = Path(cfg.out_dir), cfg.run_id or str(uuid.uuid4())
        self.artifact_path = self.out_dir / "final_model.int6.ptz"
        self.log = Logger(self.out_dir / "logs" / f"{self.run_id}.txt" if log_to_file and rt.is_master else None)
        self.ledger, self.schedule, self.results = Ledger(), Schedule(cfg), {}
        self.compiled = cfg.compile == "1" or (cfg.compile == "auto" and rt.device.type == "cuda")
        self.accum = grad_accum_steps(cfg, rt.world_size)
        self.data = load_data(cfg.dataset_dir, cfg.tokenizer_file, cfg.vocab_size, cfg.eval_seq_len)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.model = apply_precision(GPT(cfg, rt.fa3).to(rt.device), rt.precision)
        self.logits_fn = self.compile(self.model.forward_logits)
        windows = max(1, cfg.val_batch_tokens // (rt.world_size * self.accum * cfg.eval_seq_len))
        self.ev = EvalContext(self.data.luts, windows, device=rt.device, val_bytes=self.data.val_bytes, amp=rt.amp,
                              rank=rt.rank, world_size=rt.world_size, static_shapes=self.compiled)
        self.step, self.train_ms, self.looping_step = 0, 0.0, None

    @classmethod
    def from_checkpoint(cls, cfg: Config, rt: Runtime, path: str | Path) -> Run:
        r = cls(cfg, rt)
        r.model.load_state_dict(torch.load(path, map_location=rt.device, weights_only=True), strict=True)
        r.model.looping = cfg.num_loops > 0
        return r

    def compile(self, fn: Callable) -> Callable:
        if self.compiled:  # the TTT step's static shapes: 2 row counts x 4 row lengths for record N (N sets 16 too)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
        return torch.compile(fn, dynamic=False, fullgraph=True) if self.compiled else fn

    def make_loader(self, kind: str | None = None) -> ShuffledSequenceLoader | DocumentPackingLoader:
        """The training loader (TRAIN_LOADER); calibration asks for shuffled windows, as record N does."""
        c = self.cfg
        cls = DocumentPackingLoader if (kind or c.train_loader) == "packed" else ShuffledSequenceLoader
        return cls(self.data.train_files, c.train_seq_len, c.vocab_size, c.seed, self.rt.rank, self.rt.world_size)

    @property
    def micro_seqs(self) -> int:
        return self.cfg.train_batch_tokens // (self.rt.world_size * self.accum * self.cfg.train_seq_len)

    def plain_eval(self, logits_fn: Callable) -> tuple[float, float]:
        L = self.cfg.eval_seq_len
        return evaluate(logits_fn, self.data.val_tokens, L, L, self.ev)

    def timed_eval(self, label: str, budget: str, fn: Callable[[], tuple[float, float]]) -> None:
        sync(self.rt.device)
        t = time.perf_counter()
        vl, vb = fn()
        sync(self.rt.device)
        dt = time.perf_counter() - t
        self.ledger.add(label.replace("-", "_").replace(" ", "_"), dt, budget)
        self.results[label] = dict(val_loss=vl, val_bpb=vb, eval_time_ms=1000 * dt)
        self.log(log_line("eval", label=label, val_loss=vl, val_bpb=vb, ms=1000 * dt))

    def log_header(self) -> None:
        """Every code file that ran (byte-exact framing: tools/parse_log.py reads them back), the environment, the
        resolved config, and what this process runs on."""
        cfg, rt, log = self.cfg, self.rt, self.log
        self.code = b"".join(body for body in code_sources().values())
        for name, body in code_sources().items():
            log(log_line("source_file", name=name, n=len(body)) + f"\n{body.decode()}", console=False)
        log("=" * 100, console=False)
        log(f"Running Python {sys.version}", console=False)
        log(f"Running PyTorch {torch.__version__}", console=False)
        log(nvidia_smi(), console=False)
        log("=" * 100, console=False)
        log("Hyperparameters:")
        derived = dict(dataset_dir=cfg.dataset_dir, tokenizer_file=cfg.tokenizer_file, world_size=rt.world_size,
                       rank=rt.rank, grad_accum_effective=self.accum, device=rt.device, run_id=self.run_id)
        for key, value in sorted({**dataclasses.asdict(cfg), **derived}.items()):
            log(f"  {key}: {value}")
        log(log_line("train_shards", n=len(self.data.train_files)))
        log(log_line("val_tokens", n=self.data.val_tokens.numel() - 1))
        log(log_line("tokenizer", sha256=self.data.tokenizer_sha256, vocab=cfg.vocab_size))
        log(log_line("val_bytes", source="lut" if self.data.val_bytes is None else "sidecar", total=self.data.byte_total()))
        log(log_line("model_params", n=sum(p.numel() for p in self.model.parameters())))
        log(log_line("runtime", world_size=rt.world_size, accum=self.accum, device=rt.device.type, cpus=os.cpu_count(),
                     attention=rt.attention, compile=self.compiled, precision=rt.precision))
        if rt.device.type == "cuda" and rt.fa3 is None:
            log(f"WARNING attention: FlashAttention-3 unusable ({rt.attention_note}); running SDPA, slower than the "
                f"record's attention. ATTENTION=fa3 makes this an error.")

    def train(self) -> None:
        """Compile warm-up (undone), then the timed loop under the wallclock cap; EMA weights applied at the end."""
        cfg, rt, model, log, sched = self.cfg, self.rt, self.model, self.log, self.schedule
        ns = self.compile(zeropower_via_newtonschulz5)
        self.opts = opts = Optimizers(model, cfg, rt.rank, rt.world_size, rt.ns_dtype, ns)
        train_model: nn.Module = self.compile(model)
        if rt.world_size > 1:
            torch._dynamo.config.optimize_ddp = False  # as record P: DDP around a compiled module
            train_model = nn.parallel.DistributedDataParallel(
                train_model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
        if sched.cap_ms > 0:
            log(log_line("gptq_reserve", seconds=cfg.gptq_reserve_seconds, ms=sched.cap_ms))

        def step_on(loader: ShuffledSequenceLoader) -> Tensor:
            batches = [tuple(t.to(rt.device, non_blocking=True) for t in loader.next_batch(self.micro_seqs))
                       for _ in range(self.accum)]
            return train_step(train_model, opts, batches, cfg.grad_clip_norm, rt.amp)

        t0 = time.perf_counter()
        compile_warmup(model, opts, step_on, self.make_loader, cfg, log)
        sync(rt.device)
        self.ledger.add("compile_warmup", time.perf_counter() - t0, "none")
        loader = self.make_loader()
        ema = [p.detach().float().clone() for p in model.parameters()]
        step, stop_after = 0, None
        sync(rt.device)
        t_start = time.perf_counter()
        while True:
            last = step == cfg.iterations or step == stop_after
            if last or (cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0):
                sync(rt.device)
                self.train_ms += 1000 * (time.perf_counter() - t_start)
                vl, vb = self.plain_eval(self.logits_fn)
                log(log_line("val", step=step, iterations=cfg.iterations, val_loss=vl, val_bpb=vb))
                sync(rt.device)
                t_start = time.perf_counter()
            if last:
                if stop_after is not None and step < cfg.iterations:
                    log(log_line("stop", ms=self.train_ms, step=step, iterations=cfg.iterations))
                break
            frac = sched.frac(step, self.train_ms + 1000 * (time.perf_counter() - t_start))
            if sched.looping(frac) and not model.looping:
                model.looping, self.looping_step = True, step
                enc, dec = layer_schedule(cfg.num_layers, cfg.loop_start, cfg.loop_end, cfg.num_loops, True)
                log(log_line("layer_loop", step=step, frac=frac, encoder=enc, decoder=dec))
            opts.set_schedule(sched.lr_mul(frac), sched.muon_momentum(step))
            loss = step_on(loader)
            ema_update_(ema, list(model.parameters()), cfg.ema_decay)
            step += 1
            elapsed_ms = self.train_ms + 1000 * (time.perf_counter() - t_start)
            flags = all_reduce_(torch.stack(((~torch.isfinite(loss)).float(), torch.tensor(
                float(sched.cap_ms > 0 and elapsed_ms >= sched.cap_ms), device=rt.device))), dist.ReduceOp.MAX)
            if flags[0] > 0:
                log(f"stopping: non-finite train loss at step {step}")
                raise SystemExit(1)
            if step <= 5 or step % cfg.train_log_every == 0:
                log(log_line("train", step=step, iterations=cfg.iterations, train_loss=loss.item(),
                             minutes=elapsed_ms / 60000, tok_s=step * cfg.train_batch_tokens / (elapsed_ms / 1000)))
            if flags[1] > 0 and stop_after is None:
                stop_after = step
        self.step = step
        self.ledger.add("train_loop", self.train_ms / 1000, "train")
        if rt.device.type == "cuda":
            log(log_line("peak_memory", allocated=torch.cuda.max_memory_allocated() // 2**20,
                         reserved=torch.cuda.max_memory_reserved() // 2**20))
        log("ema:applying EMA weights")
        with torch.no_grad():
            for p, e in zip(model.parameters(), ema):
                p.copy_(e.to(p.dtype))
        model.looping = cfg.num_loops > 0  # the final model always runs looped
        self.timed_eval("pre-quantization post-ema", "none", lambda: self.plain_eval(self.logits_fn))
        if rt.is_master:  # the float checkpoint: input of tools/requantize.py, not counted
            torch.save(model.state_dict(), self.out_dir / "final_model.pt")
            log(log_line("serialized_raw", n=(self.out_dir / "final_model.pt").stat().st_size))
            log(log_line("code_size", n=len(self.code)))

    def calibrate(self, seconds: float | None = None) -> dict[str, Tensor]:
        """GPTQ Hessians from a fresh training loader, averaged over every rank's batches. Calibration reads training
        data, so it stops taking batches before one would end past `seconds` (default: what is left of the train
        budget after the loop)."""
        cfg, rt, log = self.cfg, self.rt, self.log
        seconds = self.schedule.calibration_seconds(self.train_ms) if seconds is None else seconds
        log("GPTQ:collecting Hessians from calibration data...")
        sync(rt.device)
        t = time.perf_counter()
        loader = self.make_loader("shuffled")

        def batches() -> Iterator[Tensor]:
            for i in range(cfg.gptq_calibration_batches):
                spent = time.perf_counter() - t
                if i > 0 and spent + spent / i > seconds:  # the next batch would end past the train budget
                    return
                yield loader.next_batch(self.micro_seqs)[0].to(rt.device)

        hessians, count = collect_hessians(self.model, batches(), cfg.passthrough_numel, rt.amp)
        total = int(all_reduce_(torch.tensor(float(count), device=rt.device)))
        for name in sorted(hessians):  # improvement on upstream: calibrate on every rank's data, not rank 0's only
            hessians[name] = all_reduce_(hessians[name]) / total
        sync(rt.device)
        self.ledger.add("gptq_hessians", time.perf_counter() - t, "train")
        wanted = cfg.gptq_calibration_batches * rt.world_size
        if total < wanted:
            log(log_line("gptq_cut", done=total, wanted=wanted, limit=cfg.max_wallclock_seconds))
        log(log_line("gptq_collected", n=len(hessians), seconds=time.perf_counter() - t))
        return hessians

    def serialize(self, hessians: dict[str, Tensor], path: Path | None = None, cfg: Config | None = None,
                  method: str = "gptq") -> int:
        """GPTQ (on the master, where the weights are) and the artifact, written atomically; every rank waits for it.
        cfg overrides the quantization settings (tools/requantize.py sweeps them). Returns the artifact's bytes."""
        cfg, path, log = cfg or self.cfg, path or self.artifact_path, self.log
        t = time.perf_counter()
        if self.rt.is_master:
            state = {k: v.detach() for k, v in self.model.state_dict().items()}
            roles = {k: r for k, r in quant_roles(self.model).items() if state[k].numel() > cfg.passthrough_numel}
            qtensors = quantize_state_dict(
                state, hessians, matrix_bits=cfg.matrix_bits, embed_bits=cfg.embed_bits, roles=roles,
                embed_clip_sigmas=cfg.embed_clip_sigmas, attn_clip_sigmas=cfg.attn_clip_sigmas,
                mlp_clip_sigmas=cfg.mlp_clip_sigmas,
                lqer_rank=cfg.lqer_rank if cfg.lqer_enabled else 0, lqer_top_k=cfg.lqer_top_k,
                lqer_group=cfg.lqer_asym_group, passthrough_numel=cfg.passthrough_numel, method=method)
            save_artifact(path, encode_artifact(qtensors, codec=cfg.compressor))
            n, code = path.stat().st_size, len(getattr(self, "code", b""))
            log("Quantized weights:")
            for line in describe(qtensors):
                log(f"  {line}")
            log(log_line("serialized", codec=cfg.compressor, n=n))
            log(log_line("total_size", codec=cfg.compressor, n=n + code))
            for part, value in (("code", code), ("model", n), ("total", n + code)):
                log(log_line("bytes", part=part, n=value))
            log(log_line("artifact", name=path.name, sha256=sha256_file(path)))
        if dist_ready():
            dist.barrier()
        self.ledger.add("serialize", time.perf_counter() - t, "none")
        return path.stat().st_size

    def score(self, path: Path | None = None) -> dict[str, dict[str, float]]:
        """Every rank reloads the artifact from disk, and every score below comes from it: quantized (diagnostic),
        sliding window and record N's phased score-first TTT (the eval budget; it changes qmodel's weights)."""
        cfg, rt, val, L = self.cfg, self.rt, self.data.val_tokens, self.cfg.eval_seq_len
        t = time.perf_counter()
        qmodel = load_quantized_model(path or self.artifact_path, cfg, rt.device, rt.precision, rt.fa3)
        self.ledger.add("deserialize", time.perf_counter() - t, "none")
        qlogits = self.compile(qmodel.forward_logits)
        adapters = lambda bsz, gen: TTTAdapters(qmodel, bsz, cfg.ttt_lora_rank, cfg.ttt_lora_alpha, gen)
        compiled_ttt = self.compile(ttt_forward)
        ttt_logits = lambda ids, lora: compiled_ttt(qmodel, ids, lora)
        if self.compiled:  # compile outside the eval clock, on random tokens (no val data), like record N
            t = time.perf_counter()
            with torch.no_grad(), rt.amp():
                qlogits(torch.randint(0, cfg.vocab_size, (self.ev.batch_windows, L), device=rt.device))
            qmodel.requires_grad_(False)  # as in the TTT: gradients reach the adapters only
            sizes = [(n, T) for n in slot_sizes(val, cfg) for T in context_sizes(cfg.ttt_chunk_size,
                     cfg.ttt_eval_seq_len, True)] if cfg.ttt_enabled else []  # row counts: from the document count
            for n, T in sizes:  # the TTT forward and backward at every shape, on throwaway adapters
                with rt.amp():
                    ttt_logits(torch.randint(0, cfg.vocab_size, (n, T), device=rt.device),
                               adapters(n, torch.Generator())).float().mean().backward()
            qmodel.requires_grad_(True)
            sync(rt.device)
            self.ledger.add("eval_compile_warmup", time.perf_counter() - t, "none")
        self.timed_eval("quantized", "none", lambda: self.plain_eval(qlogits))
        if cfg.sliding_window_enabled:
            self.timed_eval("quantized_sliding_window", "eval", lambda: evaluate(qlogits, val, L, cfg.eval_stride, self.ev))
        if cfg.ttt_enabled:
            self.timed_eval("quantized_ttt_phased", "eval", lambda: eval_phased_ttt(
                qmodel, val, cfg, self.ev, adapters, ttt_logits, lambda kind, **v: self.log(log_line(kind, **v))))
        return self.results

    def summarize(self) -> dict:
        """The time ledger into the log, and run_summary.json (every figure of the final lines, machine-readable)."""
        for phase, seconds, budget in self.ledger.rows:
            self.log(log_line("ledger", phase=phase, seconds=seconds, budget=budget))
        self.log(log_line("ledger_total", train=self.ledger.total("train"), eval=self.ledger.total("eval"),
                          limit=TIME_LIMIT_SECONDS))
        rt, results = self.rt, self.results
        summary = dict(
            run_id=self.run_id, seed=self.cfg.seed, steps=self.step, train_time_ms=round(self.train_ms),
            model_params=sum(p.numel() for p in self.model.parameters()), world_size=rt.world_size,
            device=rt.device.type, precision=rt.precision, attention=rt.attention, torch_version=torch.__version__,
            layer_loop_step=self.looping_step, val_tokens=self.data.val_tokens.numel() - 1, evals=results,
            final_label=list(results)[-1], final_val_bpb=list(results.values())[-1]["val_bpb"],
            tokenizer_sha256=self.data.tokenizer_sha256,
            time_ledger=[dict(phase=p, seconds=s, budget=b) for p, s, b in self.ledger.rows],
            time_totals=dict(train=self.ledger.total("train"), eval=self.ledger.total("eval"), limit=TIME_LIMIT_SECONDS),
            config=dataclasses.asdict(self.cfg))
        if rt.is_master:
            n, code = self.artifact_path.stat().st_size, len(self.code)
            summary.update(bytes_code=code, bytes_model=n, bytes_total=code + n, bytes_limit=ARTIFACT_LIMIT_BYTES,
                           artifact=str(self.artifact_path), artifact_sha256=sha256_file(self.artifact_path),
                           log=str(self.log.path))
            tmp = self.out_dir / "run_summary.json.tmp"  # written whole or not at all
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, self.out_dir / "run_summary.json")
        return summary


def run(cfg: Config, rt: Runtime) -> dict:
    r = Run(cfg, rt, log_to_file=True)
    r.log_header()
    r.train()
    hessians = r.calibrate()
    r.serialize(hessians)
    r.score()
    return r.summarize()


def main() -> None:
    cfg = Config.from_env()
    rt = setup_runtime(cfg)
    try:
        run(cfg, rt)
    finally:
        if dist_ready():
            gc.collect()  # the run's reference cycles hold DDP's reducer (and its gloo work): free them before teardown
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
