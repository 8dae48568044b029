"""Low-bit codes for weights trained in the forward pass at that precision (experiments/pm1.py): "sign" (1 bit) and
"ternary" (log2(3) bits), with an fp16 mean |w| scale: one per tensor for signs (a per-row scale would cost 16 / cols
bits per weight, 0.125 at 128 columns, for a number the ±1 forward never reads), one per row for ternary codes (pure
tensor functions).

No Hessian and no error feedback: the model's forward already uses exactly these codes (times a fixed 1/sqrt(fan_in)),
so storing them is lossless for that model. The scale only makes `dequantize` give a weight of the right magnitude
(±scale); a model whose forward re-derives the codes from the dequantized weight gets the same codes back.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LOWBIT_EPS", "absmean_scale", "sign_quantize", "ternary_codes", "ternary_quantize"]

LOWBIT_EPS = 2.0**-24  # fp16's smallest subnormal: the floor of every scale, so a stored scale is never 0


def absmean_scale(w: Tensor) -> Tensor:
    """Per-row mean |w| in fp32 [rows, 1], floored at LOWBIT_EPS."""
    return w.detach().float().abs().mean(dim=1, keepdim=True).clamp_min(LOWBIT_EPS)


def _fp16_scale(s: Tensor) -> Tensor:
    return s.reshape(-1).clamp(LOWBIT_EPS, 65504.0).half()


def sign_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """(codes, scale): codes int8 [rows, cols] = +1 where w >= 0 (so +0.0 and -0.0 are +1), -1 elsewhere (NaN -> -1);
    scale fp16 [1] = mean |w| of the whole tensor, in [2**-24, 65504]. Dequantized: codes * scale."""
    if w.ndim != 2:
        raise ValueError(f"sign_quantize: need a 2-D weight, got shape {tuple(w.shape)}")
    codes = torch.where(w.detach() >= 0, 1, -1).to(torch.int8)
    return codes, _fp16_scale(absmean_scale(w.reshape(1, -1)))


def ternary_codes(w: Tensor) -> Tensor:
    """BitNet b1.58 absmean ternary (Ma et al. 2024), per row: clamp(round(w / mean|w_row|), -1, 1), fp32 math."""
    return torch.round(w.detach().float() / absmean_scale(w)).clamp_(-1, 1)


def ternary_quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """(codes, scale): codes int8 [rows, cols] in {-1, 0, 1} (`ternary_codes`), scale fp16 [rows] = mean |w| of the
    row. Re-deriving codes from the dequantized codes * scale gives the same codes (a nonzero code is >= the new
    row mean, a zero stays zero), so a ternary forward reloads exactly."""
    if w.ndim != 2:
        raise ValueError(f"ternary_quantize: need a 2-D weight, got shape {tuple(w.shape)}")
    return ternary_codes(w).to(torch.int8), _fp16_scale(absmean_scale(w))
