"""LQER: a low-rank correction of the quantization residual, stored as INT2 / INT4 factors (pure tensor functions).

LQER asymmetric: PR #1797. After GPTQ, the residual `E = W − q·s` of a matrix is approximated by its rank-r SVD
truncation `A·B` with `A = U[:, :r]·S[:r]` [rows, r] and `B = Vᵀ[:r, :]` [r, cols]. A is stored as INT2 codes in
[−2, 1] with one fp16 scale per matrix (max|A| / 1.5); B as INT4 codes in [−8, 7] with one fp16 scale per group of
`group` consecutive elements of B flattened row-major (max|g| / 7.5; the last group may be shorter). The dequantized
weight is `q·s + (qA·sA)(qB·sB)`. Codes live in int8 containers like the GPTQ codes. docs/artifact.md has the format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "LQER_A_RANGE",
    "LQER_B_RANGE",
    "LQERFactors",
    "lqer_correction",
    "lqer_factors",
    "lqer_group_count",
    "quantize_a",
    "quantize_b",
]

LQER_A_RANGE = (-2, 1)  # INT2, asymmetric
LQER_B_RANGE = (-8, 7)  # INT4, asymmetric
_MIN_SCALE = 2.0**-24  # fp16's smallest subnormal: every stored step stays > 0


@dataclass(frozen=True, eq=False)
class LQERFactors:
    """Quantized factors of one matrix's correction: `a_codes` int8 [rows, rank], `a_scale` fp16 [1], `b_codes` int8
    [rank, cols], `b_scale` fp16 [ceil(rank·cols / group)]."""

    a_codes: Tensor
    a_scale: Tensor
    b_codes: Tensor
    b_scale: Tensor
    group: int

    @property
    def rank(self) -> int:
        return self.a_codes.shape[1]


def lqer_group_count(rank: int, cols: int, group: int) -> int:
    """Number of B groups (and fp16 B scales): ceil(rank·cols / group)."""
    return -(-rank * cols // group)


def quantize_a(a: Tensor) -> tuple[Tensor, Tensor]:
    """INT2 codes `clamp(round(A / sA), −2, 1)` with one per-matrix step `sA = max|A| / 1.5` (fp16, used rounded)."""
    a = a.float()
    s = (a.abs().max() / 1.5).clamp_min(_MIN_SCALE).half().reshape(1)
    q = torch.round(a / s.float()).clamp_(*LQER_A_RANGE).to(torch.int8)
    return q, s


def quantize_b(b: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """INT4 codes `clamp(round(g / s_g), −8, 7)` per group g of `group` consecutive elements of B flattened, with
    `s_g = max|g| / 7.5` (fp16, used rounded); a short last group is padded with zeros for its max only."""
    if group < 1:
        raise ValueError(f"lqer: group must be >= 1, got {group}")
    flat = b.float().reshape(-1)
    n = flat.numel()
    padded = torch.cat([flat, flat.new_zeros(-n % group)]).reshape(-1, group)
    s = (padded.abs().amax(dim=1) / 7.5).clamp_min(_MIN_SCALE).half()
    q = torch.round(padded / s.float()[:, None]).clamp_(*LQER_B_RANGE).to(torch.int8)
    return q.reshape(-1)[:n].reshape(b.shape), s


def _dequantize_b(codes: Tensor, scale: Tensor, group: int) -> Tensor:
    per_elem = scale.float().repeat_interleave(group)[: codes.numel()]
    return codes.float().reshape(-1).mul(per_elem).reshape(codes.shape)


def lqer_factors(residual: Tensor, rank: int, group: int = 64) -> LQERFactors:
    """Quantized rank-`rank` factors of `residual` [rows, cols] (the SVD runs on the CPU in fp64, so the result does
    not depend on the device); the rank is capped at min(rows, cols)."""
    if rank < 1:
        raise ValueError(f"lqer: rank must be >= 1, got {rank}")
    e = residual.detach().to("cpu", torch.float64)
    r = min(rank, *e.shape)
    U, S, Vh = torch.linalg.svd(e, full_matrices=False)
    a_codes, a_scale = quantize_a((U[:, :r] * S[:r]).float())
    b_codes, b_scale = quantize_b(Vh[:r, :].float(), group)
    return LQERFactors(a_codes.contiguous(), a_scale, b_codes.contiguous(), b_scale, group)


def lqer_correction(f: LQERFactors) -> Tensor:
    """The dequantized correction `(qA·sA)(qB·sB)` as fp32 [rows, cols]."""
    a = f.a_codes.float() * f.a_scale.float()
    return a @ _dequantize_b(f.b_codes, f.b_scale, f.group)
