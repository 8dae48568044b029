"""Full-Hessian GPTQ with actorder and fixed SDClip scales, plus the state-dict level API used by the trainer."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from quant.lowbit import sign_quantize, ternary_quantize
from quant.lqer import LQERFactors, lqer_correction, lqer_factors
from quant.sdclip import quantize_rtn, sdclip_scale

__all__ = [
    "LOWBIT_ROLES",
    "ROLES",
    "QTensor",
    "accumulate_hessian",
    "dequantize",
    "describe",
    "gptq_quantize_weight",
    "quantize_state_dict",
]


def accumulate_hessian(H: Tensor | None, x: Tensor) -> Tensor:
    """Return `H + XᵀX` in fp32 for x flattened to [tokens, in_features]; H is updated in place (created if None).

    Autocast is switched off here: calibration runs under bf16 autocast on GPU, where `x.T @ x` would come out bf16
    (losing the sums' precision) and the next `addmm_` of fp32 inputs into a bf16 H would raise."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if H is None:
            return x.T @ x
        return H.addmm_(x.T, x)


def _gptq_inverse_factor(H: Tensor) -> Tensor:
    """Upper Cholesky factor U of H⁻¹ (H already damped); more damping if H is not numerically PD, identity (RTN) last."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean_diag = H.diagonal().mean()
    for extra in (0.0, 0.1, 1.0, 10.0):
        L, info = torch.linalg.cholesky_ex(H + extra * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0 and bool(torch.isfinite(U).all()):
                return U
    return eye


def gptq_quantize_weight(w: Tensor, H: Tensor, scale: Tensor, clip_range: int, block_size: int = 128) -> Tensor:
    """GPTQ codes (int8 [rows, cols], original column order) for w with input Hessian H ≈ XᵀX [cols, cols].

    GPTQ (Frantar et al. 2022, arXiv:2210.17323) with actorder and full-Hessian error feedback, as in PR #1493: each
    column is rounded at the fixed per-row step `scale` (SDClip, never re-fitted), and its rounding error, divided by
    U[j, j], is pushed onto the not-yet-quantized columns through row j of U, the upper Cholesky factor of H⁻¹
    (H⁻¹ = UᵀU). This greedily minimizes the layer-output error ‖XWᵀ − XQᵀ‖; with H = I it is round-to-nearest.
    """
    rows, cols = w.shape
    if H.shape != (cols, cols) or scale.shape != (rows,):
        raise ValueError(f"gptq: w {tuple(w.shape)} needs H ({cols}, {cols}) and scale ({rows},), "
                         f"got {tuple(H.shape)} and {tuple(scale.shape)}")
    W = w.detach().float().clone()
    H = H.detach().to(W.device, torch.float32, copy=True)
    dead = H.diagonal() == 0  # inputs that never fire: their weights cannot matter, so code them as 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(0.01 * H.diagonal().mean())  # 1% damping
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)  # actorder: most active inputs first
    W, H = W[:, perm], H[perm][:, perm]
    U = _gptq_inverse_factor(H)
    s = scale.float()
    Q = torch.zeros(rows, cols, dtype=torch.int8, device=W.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for j in range(i2 - i1):
            q = torch.round(W1[:, j] / s).clamp_(-clip_range, clip_range)
            Q[:, i1 + j] = q.to(torch.int8)
            err = (W1[:, j] - q * s) / U1[j, j]
            W1[:, j:] -= err[:, None] * U1[j, j:][None, :]  # in-block error feedback
            Err1[:, j] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # lazy batch update of the remaining blocks
    return Q[:, torch.argsort(perm)]


@dataclass(frozen=True, eq=False)
class QTensor:
    """One entry of a quantized state dict: either codes (int8 [rows, cols]) + scale (fp16 [rows]), or passthrough data.

    `kind` is "gptq", "rtn", "sign" (codes ±1, bits 1), "ternary" (codes -1/0/1, bits 2) or "passthrough"; `bits` is
    the code width (0 for passthrough); `dtype` names the original dtype restored by `dequantize`; `data` holds
    passthrough values (fp16 for floats, the original dtype otherwise); `lqer` holds the optional low-rank correction
    of a gptq/rtn matrix (quant/lqer.py). Sign and ternary codes are int8 in memory, bit-/trit-packed on disk.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str
    bits: int = 0
    codes: Tensor | None = None
    scale: Tensor | None = None
    data: Tensor | None = None
    lqer: LQERFactors | None = None


ROLES = ("embed", "attn", "mlp", "matrix", "sign", "ternary")  # quantization roles of matrices; the caller assigns them
LOWBIT_ROLES = {"sign": sign_quantize, "ternary": ternary_quantize}  # role = kind; codes from the weight alone


def _check_bits(what: str, bits: int) -> None:
    if not (isinstance(bits, int) and 2 <= bits <= 8):
        raise ValueError(f"quantize_state_dict: {what} must be an int in 2..8 (codes live in int8), got {bits!r}")


def quantize_state_dict(
    state: dict[str, Tensor],
    hessians: dict[str, Tensor],
    *,
    matrix_bits: int = 6,
    matrix_clip_sigmas: float = 12.85,
    embed_bits: int = 8,
    embed_clip_sigmas: float = 20.0,
    embed_names: tuple[str, ...] = ("tok_emb.weight",),
    passthrough_numel: int = 65536,
    method: str = "gptq",
    roles: Mapping[str, str] | None = None,
    attn_bits: int | None = None,
    attn_clip_sigmas: float | None = None,
    mlp_bits: int | None = None,
    mlp_clip_sigmas: float | None = None,
    lqer_rank: int = 0,
    lqer_top_k: int = 3,
    lqer_group: int = 64,
) -> list[QTensor]:
    """Quantize a state dict in its order: 2-D floats above `passthrough_numel` elements get SDClip codes (GPTQ with
    their Hessian, round-to-nearest without one or with method="rtn"); everything else is passthrough (floats as fp16).
    Runs on the weights' device; the returned tensors are on the CPU.

    Roles: without `roles`, a quantized tensor named in `embed_names` is an "embed", every other one a "matrix".
    With `roles` (name -> one of ROLES), every quantized tensor must be named there and `embed_names` is not used.
    Bits and SDClip sigmas per role: embed -> embed_bits / embed_clip_sigmas; attn -> attn_bits / attn_clip_sigmas;
    mlp -> mlp_bits / mlp_clip_sigmas; matrix -> matrix_bits / matrix_clip_sigmas. An attn or mlp value left None
    falls back to the matrix value (per-role sigmas: record N, e.g. int7 embeddings at 14-15σ, MLP 11.5-12σ, attention
    13σ, other matrices 12.85σ). The embedding is GPTQ'd as the tied output head: rows = vocab, Hessian of the final
    hidden states (PR #1493). Roles "sign" and "ternary" (quant/lowbit.py) ignore bits, sigmas and Hessians: 1-bit
    signs (one fp16 mean |w| scale per tensor) or absmean ternary codes (one per row), for weights the model's forward
    already uses at that precision (experiments/pm1.py); they never get LQER.

    LQER (`lqer_rank` > 0 and `lqer_top_k` > 0): the `lqer_top_k` quantized tensors with the largest residual
    ‖W − q·s‖_F get a rank-`lqer_rank` INT2/INT4 correction with INT4 groups of `lqer_group` (quant/lqer.py).
    The defaults (no roles, no LQER) give today's output exactly.
    """
    if method not in ("gptq", "rtn"):
        raise ValueError(f"quantize_state_dict: method must be 'gptq' or 'rtn', got {method!r}")
    per_role_given = [k for k, v in (("attn_bits", attn_bits), ("attn_clip_sigmas", attn_clip_sigmas),
                                     ("mlp_bits", mlp_bits), ("mlp_clip_sigmas", mlp_clip_sigmas)) if v is not None]
    if roles is None and per_role_given:
        raise ValueError(f"quantize_state_dict: {', '.join(per_role_given)} need roles= (name -> role) to apply")
    bits_of = {"embed": embed_bits, "matrix": matrix_bits, "attn": matrix_bits if attn_bits is None else attn_bits,
               "mlp": matrix_bits if mlp_bits is None else mlp_bits}
    sigmas_of = {"embed": embed_clip_sigmas, "matrix": matrix_clip_sigmas,
                 "attn": matrix_clip_sigmas if attn_clip_sigmas is None else attn_clip_sigmas,
                 "mlp": matrix_clip_sigmas if mlp_clip_sigmas is None else mlp_clip_sigmas}
    for role, bits in bits_of.items():
        _check_bits(f"{role} bits", bits)
    for role, sig in sigmas_of.items():
        if not sig > 0:
            raise ValueError(f"quantize_state_dict: {role} clip sigmas must be > 0, got {sig!r}")
    lqer_on = lqer_rank > 0 and lqer_top_k > 0
    if lqer_rank < 0 or lqer_top_k < 0 or lqer_group < 1:
        raise ValueError(f"quantize_state_dict: need lqer_rank >= 0, lqer_top_k >= 0 and lqer_group >= 1, got "
                         f"{lqer_rank}, {lqer_top_k}, {lqer_group}")

    def quantized(t: Tensor) -> bool:
        return t.is_floating_point() and t.ndim == 2 and t.numel() > passthrough_numel

    if roles is not None:
        unknown = sorted({r for r in roles.values() if r not in ROLES})
        missing = [n for n, t in state.items() if quantized(t) and n not in roles]
        stray = [n for n in roles if n not in state]
        if unknown or missing or stray:
            raise ValueError("quantize_state_dict: roles= " + "; ".join(
                msg for msg in (f"has unknown roles {unknown} (use {', '.join(ROLES)})" if unknown else "",
                                f"misses quantized tensors {missing[:5]}" if missing else "",
                                f"names tensors not in the state dict {stray[:5]}" if stray else "") if msg))
    out, residual_norms = [], {}
    for name, t in state.items():
        t = t.detach()
        dtype = str(t.dtype).removeprefix("torch.")
        if not quantized(t):
            data = t.half() if t.is_floating_point() else t
            out.append(QTensor(name, tuple(t.shape), dtype, "passthrough", data=data.cpu().clone().contiguous()))
            continue
        role = roles[name] if roles is not None else ("embed" if name in embed_names else "matrix")
        if role in LOWBIT_ROLES:
            codes, scale = LOWBIT_ROLES[role](t)
            out.append(QTensor(name, tuple(t.shape), dtype, role, 1 if role == "sign" else 2, codes.cpu().contiguous(),
                               scale.cpu()))
            continue
        bits = bits_of[role]
        clip_range = 2 ** (bits - 1) - 1
        scale = sdclip_scale(t, sigmas_of[role], clip_range)
        H = hessians.get(name)
        if method == "gptq" and H is not None:
            codes, kind = gptq_quantize_weight(t, H, scale, clip_range), "gptq"
        else:
            codes, kind = quantize_rtn(t, scale, clip_range), "rtn"
        if lqer_on:
            residual_norms[len(out)] = float(torch.linalg.vector_norm(t.float() - codes.float() * scale.float()[:, None]))
        out.append(QTensor(name, tuple(t.shape), dtype, kind, bits, codes.cpu().contiguous(), scale.cpu()))
    if lqer_on:
        top = sorted(residual_norms, key=lambda i: -residual_norms[i])[:lqer_top_k]
        for i in sorted(top):
            qt = out[i]
            w = state[qt.name].detach().to("cpu", torch.float32)
            residual = w - qt.codes.float() * qt.scale.float()[:, None]
            out[i] = replace(qt, lqer=lqer_factors(residual, lqer_rank, lqer_group))
    return out


def dequantize(qtensors: list[QTensor]) -> dict[str, Tensor]:
    """State dict back from QTensors: `W = q·s[:, None]` (+ the LQER correction `(qA·sA)(qB·sB)` where present; fp32
    math) or passthrough data, cast to the original dtype."""
    out = {}
    for qt in qtensors:
        dtype = getattr(torch, qt.dtype)
        if qt.kind == "passthrough":
            out[qt.name] = qt.data.to(dtype).reshape(qt.shape)
        else:
            w = qt.codes.float() * qt.scale.float()[:, None]
            if qt.lqer is not None:
                w = w + lqer_correction(qt.lqer)
            out[qt.name] = w.to(dtype)
    return out


LOWBIT_LABELS = {"sign": "sign (1-bit)", "ternary": "ternary (1.6-bit)"}  # describe(): ternary is log2(3) ~ 1.58 bits


def describe(qtensors: list[QTensor]) -> list[str]:
    """Upstream's `Quantized weights:` lines, one per category, names with layer indices collapsed, sorted unique."""
    groups: dict[str, set[str]] = {}
    for qt in qtensors:
        label = (f"passthrough ({str(qt.data.dtype).removeprefix('torch.')})" if qt.kind == "passthrough"
                 else LOWBIT_LABELS[qt.kind] if qt.kind in LOWBIT_LABELS
                 else f"{qt.kind} (int{qt.bits})" + (f" + lqer (rank {qt.lqer.rank})" if qt.lqer is not None else ""))
        groups.setdefault(label, set()).add(re.sub(r"\.\d+(?=\.|$)", "", qt.name))
    return [f"{label}: {', '.join(sorted(names))}" for label, names in sorted(groups.items())]
