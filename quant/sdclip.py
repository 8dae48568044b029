"""SDClip per-row step sizes and round-to-nearest quantization (pure tensor functions)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["quantize_rtn", "sdclip_scale"]


def sdclip_scale(w: Tensor, clip_sigmas: float, clip_range: int) -> Tensor:
    """Per-row step `s_r = clip_sigmas * std(w[r, :]) / clip_range` (unbiased std of the original weights), fp16 [rows].

    SDClip: PR #1394 (@clarkkev). The compressed size of the codes is about their entropy, ≈ log2(σ/s) + const bits
    per weight, so a step proportional to the row's σ gives every row the same rate/distortion trade-off whatever its
    scale; at int6 with 12.85σ the clamp is almost never hit, so `clip_sigmas` is really a step-size choice.
    `clip_range = 2**(bits-1) - 1`. Callers must use the fp16-rounded value returned here.
    """
    s = clip_sigmas * w.float().std(dim=1) / clip_range
    # Upstream clamps at 1e-10, which fp16 flushes to 0; fp16's smallest subnormal 2**-24 keeps every step > 0.
    return s.clamp_min(2.0**-24).half()


def quantize_rtn(w: Tensor, scale: Tensor, clip_range: int) -> Tensor:
    """Round-to-nearest codes `clamp(round(w / s), -clip_range, clip_range)` as int8 [rows, cols]."""
    q = torch.round(w.float() / scale.float()[:, None])
    return q.clamp_(-clip_range, clip_range).to(torch.int8)
