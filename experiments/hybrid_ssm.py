"""Transformer || SSM hybrid (issue 16, LOLM-style): the record's decoder and a selective state-space core read the
same tokens in parallel; a per-dimension manifestation gate mixes them, out = rms_norm(g*h + (1-g)*z), before the
tied head. h = the whole record stack (GPT.forward_hidden, TTT adapters included); z = SSM_LAYERS residual Mamba-2
style SSD blocks on the token embeddings, state reset at every BOS; g = sigmoid(MLP([h, z, m, r])) with m a softmax
read-out of MEMORY_SLOTS learned vectors (z the query) and r a regime embedding picked by a VQ code of a detached
summary of z (REGIME_CODES codes, gradient-isolated from the main loss). Training adds CPC_WEIGHT x InfoNCE on
z_{t+k}, k = 1..CPC_HORIZON, predicted from out_t (never across a BOS), and the VQ loss; eval is CE only.

Env vars (besides train_gpt's): SSM_LAYERS=2 SSM_STATE=16 SSM_EXPAND=2 SSM_HEAD_DIM=32 SSM_CHUNK=64 SSM_CONV=4
(0 = no conv) HYBRID_GATE=1 (0 = fixed 0.5h+0.5z) REGIME_CODES=16 REGIME_DIM=32 MEMORY_SLOTS=32 CPC_WEIGHT=0.1
CPC_HORIZON=4 HYBRID_LOG_EVERY=0 (0 = a hybrid_gate line after every train line). A switched-off component (0)
has no parameters. The log gets `hybrid_gate step:... layer:0 mean:... codes:n/R` lines (the gate trajectory) and
the reloaded artifact is also scored with the gate forced to 1 (decoder only) and 0 (SSM only): `quantized_gate1`,
`quantized_gate0`, before the standard scores, so the final score stays the last one.

Run: `torchrun --standalone --nproc_per_node=2 experiments/hybrid_ssm.py` (CPU) or --nproc_per_node=8 (8xH100).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import train_gpt

CPC_ANCHORS = 1024  # InfoNCE anchors per horizon and batch (the other anchors' targets are the negatives)


@dataclass(frozen=True)
class HybridConfig(train_gpt.Config):
    ssm_layers: int = 2
    ssm_state: int = 16  # N: state size per head (B_t, C_t in R^N, one group shared by the heads)
    ssm_expand: int = 2  # inner width = ssm_expand * model_dim
    ssm_head_dim: int = 32  # P: channels per SSM head (one scalar A and dt per head)
    ssm_chunk: int = 64  # SSD chunk length: quadratic inside, recurrent across chunks
    ssm_conv: int = 4  # short causal depthwise conv before the SSD (0 = off)
    hybrid_gate: bool = True  # False: fixed out = rms_norm(0.5h + 0.5z) (the learned gate's init), no gate parameters
    regime_codes: int = 16  # VQ regime codebook size (0 = off)
    regime_dim: int = 32  # dimension of the detached z summary the codes live in
    memory_slots: int = 32  # learned memory vectors read by softmax attention with z as query (0 = off)
    cpc_weight: float = 0.1  # CPC InfoNCE auxiliary loss weight (0 = off, no predictor parameters)
    cpc_horizon: int = 4
    hybrid_log_every: int = 0  # hybrid_gate line every k training steps; 0 = after every train log line

    def __post_init__(self) -> None:
        super().__post_init__()

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"bad config: {msg}")
        inner = self.ssm_expand * self.model_dim
        need(self.ssm_layers >= 1 and self.ssm_state >= 1 and self.ssm_expand >= 1 and self.ssm_chunk >= 1,
             "SSM_LAYERS, SSM_STATE, SSM_EXPAND and SSM_CHUNK must be >= 1")
        need(self.ssm_head_dim >= 1 and inner % self.ssm_head_dim == 0,
             f"SSM_HEAD_DIM={self.ssm_head_dim} must divide SSM_EXPAND * MODEL_DIM = {inner}")
        need(self.train_seq_len % self.ssm_chunk == 0 and self.eval_seq_len % self.ssm_chunk == 0,
             f"TRAIN_SEQ_LEN and EVAL_SEQ_LEN must be multiples of SSM_CHUNK={self.ssm_chunk}")
        need(self.ssm_conv >= 0 and self.regime_codes >= 0 and self.memory_slots >= 0 and self.hybrid_log_every >= 0,
             "SSM_CONV, REGIME_CODES, MEMORY_SLOTS and HYBRID_LOG_EVERY must be >= 0")
        need(self.regime_dim >= 1, "REGIME_DIM must be >= 1")
        need(self.hybrid_gate or (self.regime_codes == 0 and self.memory_slots == 0),
             "MEMORY_SLOTS and REGIME_CODES only feed the gate: set them to 0 with HYBRID_GATE=0")
        need(self.cpc_weight >= 0 and (self.cpc_weight == 0 or 1 <= self.cpc_horizon < self.train_seq_len),
             "CPC_WEIGHT must be >= 0 and CPC_HORIZON in 1..TRAIN_SEQ_LEN-1")


# -----------------------------------------------------------------------------
# Selective SSM: Mamba-2's SSD (Gu & Dao 2024, "Transformers are SSMs"), chunked, in plain PyTorch
# -----------------------------------------------------------------------------


def segsum(a: Tensor) -> Tensor:
    """(..., L) log decays -> (..., L, L) with [i, j] = a_{j+1} + ... + a_i for j <= i, -inf above the diagonal.
    Stable: a masked cumsum (no difference of two large cumsums), so -inf entries (resets) stay -inf, never NaN."""
    L = a.size(-1)
    x = a[..., None, :].expand(*a.shape, L).transpose(-1, -2)  # x[..., i, j] = a_i
    strict = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)
    s = x.masked_fill(~strict, 0.0).cumsum(-2)
    return s.masked_fill(~strict.logical_or(torch.eye(L, dtype=torch.bool, device=a.device)), -math.inf)


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, reset: Tensor, chunk: int) -> Tensor:
    """Selective scan h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t per head, with h_{t-1} := 0 where
    reset_t (a BOS starts a fresh state). x (B, T, H, P), dt (B, T, H) > 0, A (H,) < 0, Bm / Cm (B, T, N), reset
    (B, T) bool. Chunked SSD: inside a chunk the L x L decay matrix exp(segsum), across chunks the chunk-end states
    carried by the same segsum over chunk totals (a static number of chunks). Computed in fp32 (fp64 for fp64 x)
    with autocast off; T is zero-padded to a multiple of chunk (padding after a position cannot change it)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    Bsz, T, H, P = x.shape
    pad = -T % chunk
    with torch.autocast(x.device.type, enabled=False):
        x, dt, A, Bm, Cm = (t.to(dtype) for t in (x, dt, A, Bm, Cm))
        if pad:
            x, Bm, Cm = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, Bm, Cm))
            dt, reset = F.pad(dt, (0, 0, 0, pad)), F.pad(reset, (0, pad))
        c, L = (T + pad) // chunk, chunk
        a = (dt * A).masked_fill(reset[..., None], -math.inf)  # log decay into position t
        a = a.view(Bsz, c, L, H).permute(0, 3, 1, 2)  # (B, H, c, L)
        xdt = (x * dt[..., None]).view(Bsz, c, L, H, P)
        Bc, Cc = Bm.view(Bsz, c, L, -1), Cm.view(Bsz, c, L, -1)
        decay = torch.exp(segsum(a))  # (B, H, c, L, L)
        scores = torch.einsum("bcln,bcsn->bcls", Cc, Bc)
        y = torch.einsum("bcls,bhcls,bcshp->bclhp", scores, decay, xdt)  # inside each chunk
        states = torch.einsum("bcsn,bhcs,bcshp->bchpn", Bc, decay[..., -1, :], xdt)  # each chunk's end state
        states = torch.cat((torch.zeros_like(states[:, :1]), states), dim=1)
        carry = torch.exp(segsum(F.pad(a.sum(-1), (1, 0))))  # (B, H, c+1, c+1) decay between chunk ends
        entering = torch.einsum("bhzc,bchpn->bzhpn", carry, states)[:, :-1]  # the state entering each chunk
        y = y + torch.einsum("bcln,bchpn,bhcl->bclhp", Cc, entering, torch.exp(a.cumsum(-1)))
        return y.reshape(Bsz, c * L, H, P)[:, :T]


def ssd_reference(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, reset: Tensor) -> Tensor:
    """ssd_scan as the plain sequential recurrence, one position at a time (the tests' ground truth)."""
    Bsz, T, H, P = x.shape
    h = x.new_zeros(Bsz, H, P, Bm.size(-1))
    ys = []
    for t in range(T):
        keep = (~reset[:, t]).to(x.dtype)[:, None, None, None]
        h = keep * torch.exp(dt[:, t] * A)[..., None, None] * h + \
            (dt[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", h, Cm[:, t]))
    return torch.stack(ys, dim=1)


def doc_ids(ids: Tensor) -> Tensor:
    """(B, T) int: the document index of each position inside its row (increments at every BOS)."""
    return torch.cumsum((ids == train_gpt.BOS_ID).int(), dim=1)


def causal_doc_conv(x: Tensor, w: Tensor, doc: Tensor) -> Tensor:
    """Depthwise causal conv over T (x (B, T, C), w (C, K), w[:, -1] on the current token) that never reads a
    token of an earlier document (taps across a BOS are zeroed)."""
    K, T = w.size(1), x.size(1)
    out = x * w[:, -1].to(x.dtype)
    for k in range(1, K):
        shifted = F.pad(x, (0, 0, k, 0))[:, :T]
        same = (doc == F.pad(doc, (k, 0), value=-1)[:, :T]).to(x.dtype)[..., None]
        out = out + shifted * same * w[:, K - 1 - k].to(x.dtype)
    return out


class SSMBlock(nn.Module):
    """One residual selective-SSM block (Mamba-2 layout): rms_norm -> in_proj -> [x | gate | B | C | dt] -> causal
    depthwise conv on x -> SiLU -> SSD (+ D skip) -> * SiLU(gate) -> rms_norm -> out_proj (zero init: identity)."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        d, self.inner, self.N = cfg.model_dim, cfg.ssm_expand * cfg.model_dim, cfg.ssm_state
        self.H, self.P, self.chunk = self.inner // cfg.ssm_head_dim, cfg.ssm_head_dim, cfg.ssm_chunk
        self.in_proj = nn.Linear(d, 2 * self.inner + 2 * self.N + self.H, bias=False)
        self.out_proj = nn.Linear(self.inner, d, bias=False)
        self.conv_w = nn.Parameter(torch.empty(self.inner, cfg.ssm_conv)) if cfg.ssm_conv > 0 else None
        self.A_log = nn.Parameter(torch.empty(self.H).uniform_(1.0, 16.0).log())  # A = -exp(A_log) in [-16, -1]
        dt0 = torch.exp(torch.empty(self.H).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt0 + torch.log(-torch.expm1(-dt0)))  # softplus(dt_bias) = dt0
        self.D = nn.Parameter(torch.ones(self.H))
        nn.init.normal_(self.in_proj.weight, std=d**-0.5)
        nn.init.zeros_(self.out_proj.weight)
        if self.conv_w is not None:
            nn.init.uniform_(self.conv_w, -cfg.ssm_conv**-0.5, cfg.ssm_conv**-0.5)

    def forward(self, x: Tensor, doc: Tensor, reset: Tensor) -> Tensor:
        B, T, _ = x.shape
        xs, gate, Bm, Cm, dt = self.in_proj(train_gpt.rms_norm(x)).split(
            (self.inner, self.inner, self.N, self.N, self.H), dim=-1)
        if self.conv_w is not None:
            xs = causal_doc_conv(xs, self.conv_w, doc)
        xs = F.silu(xs).view(B, T, self.H, self.P)
        dt = F.softplus(dt.float() + self.dt_bias)
        y = ssd_scan(xs, dt, -torch.exp(self.A_log.float()), Bm, Cm, reset, self.chunk).to(xs.dtype)
        y = (y + self.D.to(xs.dtype)[:, None] * xs).reshape(B, T, self.inner)
        return x + self.out_proj(train_gpt.rms_norm(y * F.silu(gate)))


def vq_select(s: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """(codes, VQ loss) of summaries s (..., D) against codebook (R, D), in fp32 (VQ-VAE's codebook + commitment
    losses, van den Oord et al. 2017): code = the nearest codebook row;
    loss = ||e_code - sg(s)||^2 (trains the codebook) + 0.25 ||s - sg(e_code)||^2 (commitment, trains s's maker).
    The codes carry no gradient (argmin), so nothing downstream of them reaches the selector or the codebook."""
    s, e = s.float(), codebook.float()
    dist = (s * s).sum(-1, keepdim=True) - 2 * s @ e.T + (e * e).sum(-1)
    codes = dist.argmin(-1)
    chosen = F.embedding(codes, e)
    return codes, F.mse_loss(chosen, s.detach()) + 0.25 * F.mse_loss(s, chosen.detach())


def cpc_infonce(src: Tensor, z: Tensor, doc: Tensor, predictors: list[Tensor], anchors: int = CPC_ANCHORS) -> Tensor:
    """CPC InfoNCE (van den Oord et al. 2018), mean over horizons k = 1..len(predictors): anchor (b, t) predicts
    z[b, t+k] as W_k src[b, t]; the candidates are the targets of the other anchors (in-batch negatives). A pair
    whose target lies in another document (a BOS in t+1..t+k) is no positive and no candidate. Up to `anchors`
    anchors per horizon (all of them when the batch has no more, else a random sample). fp32 logits / sqrt(D)."""
    Bsz, T, D = src.shape
    total = src.new_zeros((), dtype=torch.float32)
    for k, w in enumerate(predictors, start=1):
        n = Bsz * (T - k)
        if n <= anchors:
            flat = torch.arange(n, device=src.device)
        else:
            flat = torch.randint(0, n, (anchors,), device=src.device)
        b, t = flat // (T - k), flat % (T - k)
        valid = doc[b, t] == doc[b, t + k]
        pred = F.linear(src[b, t], w.to(src.dtype)).float()
        logits = pred @ z[b, t + k].float().T / math.sqrt(D)
        logits = logits.masked_fill(~valid[None, :], -1e9)
        nll = F.cross_entropy(logits, torch.arange(len(flat), device=src.device), reduction="none")
        total = total + torch.where(valid, nll, 0.0).sum() / valid.sum().clamp(min=1)
    return total / max(1, len(predictors))


# -----------------------------------------------------------------------------
# The hybrid model
# -----------------------------------------------------------------------------


class HybridGPT(train_gpt.GPT):
    """The record GPT (h) || an SSM stack (z), mixed per dimension by the manifestation gate before the tied head.
    forward_hidden returns the mixed state, so forward_logits, every eval path (plain, sliding, TTT: adapters go to
    the decoder and the head) and GPTQ's head Hessian all see the hybrid.

    Gradients: the main loss (CE) trains the decoder, the SSM, the gate, the memory and the regime embedding
    table (through the selected rows); it never reaches the regime selector or the codebook (codes = argmin). The
    VQ loss trains the codebook (codebook term) and the selector (commitment term) only: its input z is detached.
    CPC trains its predictors, and through out_t and z_{t+k} the decoder, SSM, gate and memory.

    gate_force (buffer, NaN = learned): 1.0 mixes out of h only, 0.0 out of z only (forced-gate evals). The
    hybrid_stats / hybrid_codes buffers hold the gate sum, token count and code histogram of the latest training
    batch (overwritten each training forward) or, in eval mode, summed over eval forwards. CPC predictors are
    dropped from the state dict while export_state is set (HybridRun.serialize): they only serve training."""

    def __init__(self, cfg: HybridConfig, fa3: Callable | None = None):
        super().__init__(cfg, fa3)
        d = cfg.model_dim
        self.ssm = nn.ModuleList(SSMBlock(cfg) for _ in range(cfg.ssm_layers))
        gate_inputs = 2 + (cfg.memory_slots > 0) + (cfg.regime_codes > 0)
        self.gate_in = nn.Linear(gate_inputs * d, d, bias=False) if cfg.hybrid_gate else None
        self.gate_out = nn.Linear(d, d) if cfg.hybrid_gate else None
        if cfg.memory_slots > 0:
            self.mem_keys = nn.Parameter(torch.randn(cfg.memory_slots, d) * d**-0.5)
            self.mem_values = nn.Parameter(torch.randn(cfg.memory_slots, d))
        if cfg.regime_codes > 0:
            self.regime_selector = nn.Linear(d, cfg.regime_dim, bias=False)
            self.regime_codebook = nn.Parameter(torch.randn(cfg.regime_codes, cfg.regime_dim))
            self.regime_emb = nn.Parameter(torch.randn(cfg.regime_codes, d))
            nn.init.normal_(self.regime_selector.weight, std=d**-0.5)
        self.cpc = nn.ModuleList(nn.Linear(d, d, bias=False) for _ in range(cfg.cpc_horizon)) \
            if cfg.cpc_weight > 0 else None
        for lin in [*(self.cpc or []), *([self.gate_in] if self.gate_in is not None else [])]:
            nn.init.normal_(lin.weight, std=lin.in_features**-0.5)
        if self.gate_out is not None:  # g = 0.5 at init
            nn.init.zeros_(self.gate_out.weight)
            nn.init.zeros_(self.gate_out.bias)
        self.register_buffer("gate_force", torch.tensor(math.nan), persistent=False)
        self.register_buffer("hybrid_stats", torch.zeros(2), persistent=False)  # gate sum, tokens
        self.register_buffer("hybrid_codes", torch.zeros(max(1, cfg.regime_codes)), persistent=False)
        self.export_state = False
        self._register_state_dict_hook(HybridGPT._drop_train_only)
        self.register_load_state_dict_post_hook(HybridGPT._allow_missing_train_only)

    def train_only_names(self) -> list[str]:
        return [f"cpc.{n}" for n, _ in self.cpc.named_parameters()] if self.cpc is not None else []

    @staticmethod
    def _drop_train_only(module: HybridGPT, state: dict, prefix: str, local_metadata: dict) -> None:
        if module.export_state:
            for name in module.train_only_names():
                state.pop(prefix + name, None)

    @staticmethod
    def _allow_missing_train_only(module: HybridGPT, incompatible: object) -> None:
        """An artifact has no CPC predictors: loading one leaves them at init (eval never uses them)."""
        train_only = set(module.train_only_names())
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if k not in train_only]

    def ssm_hidden(self, ids: Tensor) -> Tensor:
        """z: the SSM stack on the token embeddings, final rms_norm; state and conv reset at every BOS."""
        doc, reset = doc_ids(ids), ids == train_gpt.BOS_ID
        z = self.tok_emb(ids)
        for blk in self.ssm:
            z = blk(z, doc, reset)
        return train_gpt.rms_norm(z)

    def hybrid_parts(self, ids: Tensor, lora: train_gpt.TTTAdapters | None = None) -> dict[str, Tensor]:
        """out (mixed, normed), h, z, the learned gate g (before any forcing), codes and the VQ loss."""
        cfg = self.cfg
        h = super().forward_hidden(ids, lora)
        z = self.ssm_hidden(ids).to(h.dtype)
        parts = dict(h=h, z=z)
        if self.gate_in is not None:
            feats = [h, z]
            if cfg.memory_slots > 0:
                attn = torch.softmax(z @ self.mem_keys.to(z.dtype).T / math.sqrt(cfg.model_dim), dim=-1)
                feats.append(attn @ self.mem_values.to(z.dtype))
            if cfg.regime_codes > 0:
                codes, parts["vq"] = vq_select(self.regime_selector(z.detach()), self.regime_codebook)
                parts["codes"] = codes
                feats.append(F.embedding(codes, self.regime_emb).to(h.dtype))
            g = torch.sigmoid(self.gate_out(F.silu(self.gate_in(torch.cat(feats, dim=-1))))).to(h.dtype)
        else:
            g = torch.full_like(h[..., :1], 0.5)
        forced = torch.where(torch.isnan(self.gate_force), g, self.gate_force.to(g.dtype))
        parts.update(g=g, out=train_gpt.rms_norm(forced * h + (1 - forced) * z))
        return parts

    @torch.no_grad()
    def _record(self, parts: dict[str, Tensor], accumulate: bool) -> None:
        g = parts["g"].float()
        stats = torch.stack((g.mean(-1).sum(), torch.tensor(float(g[..., 0].numel()), device=g.device)))
        codes = torch.zeros_like(self.hybrid_codes)
        if "codes" in parts:
            flat = parts["codes"].flatten()
            codes = codes.index_add(0, flat, torch.ones_like(flat, dtype=codes.dtype))
        if accumulate:
            self.hybrid_stats.add_(stats)
            self.hybrid_codes.add_(codes)
        else:
            self.hybrid_stats.copy_(stats)
            self.hybrid_codes.copy_(codes)

    def forward_hidden(self, ids: Tensor, lora: train_gpt.TTTAdapters | None = None) -> Tensor:
        parts = self.hybrid_parts(ids, lora)
        if not self.training:
            self._record(parts, accumulate=True)
        return parts["out"]

    def forward(self, ids: Tensor, targets: Tensor) -> Tensor:
        """Training: CE + CPC_WEIGHT * CPC + VQ loss (the latter two only exist when switched on). Eval: CE."""
        if not self.training:
            return super().forward(ids, targets)
        parts = self.hybrid_parts(ids)
        self._record(parts, accumulate=False)
        c = self.cfg.logit_softcap  # GPT.forward_logits' head, on the mixed state
        logits = c * torch.tanh(F.linear(parts["out"], self.tok_emb.weight) / c)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        if self.cpc is not None:
            loss = loss + self.cfg.cpc_weight * cpc_infonce(parts["out"], parts["z"], doc_ids(ids),
                                                            [lin.weight for lin in self.cpc])
        if "vq" in parts:
            loss = loss + parts["vq"]
        return loss

    def gate_summary(self) -> tuple[float, int]:
        """(mean gate, distinct regime codes) of what hybrid_stats / hybrid_codes hold."""
        s = self.hybrid_stats.detach().cpu()
        return float(s[0] / s[1].clamp(min=1)), int((self.hybrid_codes > 0).sum()) if self.cfg.regime_codes else 0

    def reset_stats(self) -> None:
        self.hybrid_stats.zero_()
        self.hybrid_codes.zero_()


def hybrid_matrices(model: HybridGPT) -> list[str]:
    """The hybrid's 2-D weight matrices (SSM projections, gate, memory, regime selector, CPC predictors). The conv
    filters, codebook and regime embedding are tables of per-channel / per-code vectors, not maps: not here."""
    names = [f"{prefix}.{n}.weight" for prefix in ("ssm", "cpc") if getattr(model, prefix) is not None
             for n, m in getattr(model, prefix).named_modules() if isinstance(m, nn.Linear)]
    names += [f"{n}.weight" for n in ("gate_in", "gate_out", "regime_selector") if getattr(model, n, None) is not None]
    names += [n for n in ("mem_keys", "mem_values") if hasattr(model, n)]
    return names


ORIGINAL_PARAM_ROLES = train_gpt.param_roles
ORIGINAL_QUANT_ROLES = train_gpt.quant_roles
ORIGINAL_CODE_SOURCES = train_gpt.code_sources


def hybrid_param_roles(model: HybridGPT) -> dict[str, str]:
    """The record's roles, plus 'muon' for the hybrid's matrices; every other new tensor (A_log, dt_bias, D, conv
    filters, gate bias, codebook, regime embedding) is 'scalar' (AdamW), as the record's gains and tables."""
    roles = ORIGINAL_PARAM_ROLES(model)
    roles.update(dict.fromkeys(hybrid_matrices(model), "muon"))
    return roles


def hybrid_quant_roles(model: HybridGPT) -> dict[str, str]:
    """The record's roles, plus quant's 'matrix' role for the hybrid's matrices (matrix_bits at quant's 12.85 sigma
    default, Run.serialize passes no matrix sigma): they are neither attention nor MLP weights, so ATTN/MLP_CLIP_SIGMAS
    sweeps leave them alone. Smaller tensors (and all tables) stay fp16 passthrough. CPC predictors are not exported."""
    roles = ORIGINAL_QUANT_ROLES(model)
    skip = set(model.train_only_names()) if model.export_state else set()
    roles.update({n: "matrix" for n in hybrid_matrices(model) if n not in skip})
    return roles


def hybrid_code_sources() -> dict[str, bytes]:
    files = ORIGINAL_CODE_SOURCES()
    here = Path(__file__).resolve()
    if Path(train_gpt.__file__).resolve() != here:  # packed: train_gpt is this very file
        files[f"experiments/{here.name}"] = here.read_bytes()
    return files


# -----------------------------------------------------------------------------
# The run: gate trajectory in the log, forced-gate scores of the artifact
# -----------------------------------------------------------------------------

TRAIN_LINE = re.compile(r"^(\d+)/\d+ train_loss:")


class HybridLogger:
    """Wraps the run's Logger: every line goes through; after a train line, `after(step)` may add lines."""

    def __init__(self, inner: Callable[..., None], after: Callable[[int], None]):
        self.inner, self.after = inner, after
        self.path = getattr(inner, "path", None)

    def __call__(self, msg: str, console: bool = True) -> None:
        self.inner(msg, console)
        m = TRAIN_LINE.match(msg)
        if m:
            self.after(int(m.group(1)))


class HybridRun(train_gpt.Run):
    """Run with the gate trajectory in the log (`hybrid_gate step:k layer:0 mean:g codes:n/R`: the mean gate and
    the distinct regime codes of rank 0's latest training micro-batch) and the forced-gate scores of the artifact."""

    def __init__(self, cfg: HybridConfig, rt: train_gpt.Runtime, log_to_file: bool = False):
        super().__init__(cfg, rt, log_to_file)
        self.log = HybridLogger(self.log, self._after_train_line)

    def gate_line(self, model: HybridGPT, where: str) -> str:
        mean, used = model.gate_summary()
        return f"hybrid_gate {where} layer:0 mean:{mean:.4f} codes:{used}/{self.cfg.regime_codes}"

    def _after_train_line(self, step: int) -> None:
        if self.cfg.hybrid_log_every == 0 and self.rt.is_master:
            self.log.inner(self.gate_line(self.model, f"step:{step}"))

    def train(self) -> None:
        """Run.train; with HYBRID_LOG_EVERY=k > 0 a hybrid_gate line every k steps, from the EMA update that ends
        each timed step (the compile warm-up steps do not update the EMA, so they are not counted)."""
        k = self.cfg.hybrid_log_every
        if k == 0:
            return super().train()
        original, steps = train_gpt.ema_update_, [0]

        def ema_and_log(ema: list[Tensor], params: list[Tensor], decay: float) -> None:
            original(ema, params, decay)
            steps[0] += 1
            if steps[0] % k == 0 and self.rt.is_master:
                self.log.inner(self.gate_line(self.model, f"step:{steps[0]}"))

        train_gpt.ema_update_ = ema_and_log
        try:
            super().train()
        finally:
            train_gpt.ema_update_ = original

    def serialize(self, hessians: dict[str, Tensor], path: Path | None = None, cfg: HybridConfig | None = None,
                  method: str = "gptq") -> int:
        """Run.serialize without the CPC predictors (training-only weights) in the artifact."""
        self.model.export_state = True
        try:
            return super().serialize(hessians, path, cfg, method)
        finally:
            self.model.export_state = False

    def score(self, path: Path | None = None) -> dict[str, dict[str, float]]:
        """The reloaded artifact with the gate forced to 1 (h only) and to 0 (z only), plain eval, budget none; then
        Run.score. The forced scores come first so the final score stays the last line and the last result. The
        learned gate's statistics on the val tokens (g does not depend on the forcing) follow the gate-1 score."""
        cfg, rt = self.cfg, self.rt
        qmodel = train_gpt.load_quantized_model(path or self.artifact_path, cfg, rt.device, rt.precision, rt.fa3)
        qlogits = self.compile(qmodel.forward_logits)
        for label, force in (("quantized_gate1", 1.0), ("quantized_gate0", 0.0)):
            qmodel.gate_force.fill_(force)
            qmodel.reset_stats()
            self.timed_eval(label, "none", lambda fn=qlogits: self.plain_eval(fn))
            if force == 1.0:
                train_gpt.all_reduce_(qmodel.hybrid_stats)
                train_gpt.all_reduce_(qmodel.hybrid_codes)
                self.log(self.gate_line(qmodel, "eval:val"))
        del qmodel, qlogits
        return super().score(path)


PATCHES = dict(Config=HybridConfig, GPT=HybridGPT, Run=HybridRun, param_roles=hybrid_param_roles,
               quant_roles=hybrid_quant_roles, code_sources=hybrid_code_sources)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """train_gpt's globals rebound to the hybrid's (train_gpt.main looks them up at call time); restored on exit."""
    saved = {k: getattr(train_gpt, k) for k in PATCHES}
    try:
        for k, v in PATCHES.items():
            setattr(train_gpt, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(train_gpt, k, v)


def experiment_main() -> None:
    with installed():
        train_gpt.main()


if __name__ == "__main__":
    experiment_main()
