"""Parameters and artifact bytes of a config, counted on the real model (train_gpt.GPT on the meta device).

Size model: every SDClip code costs the entropy of a unit Gaussian rounded at its step (SDClip: PR #1394) plus one
constant `delta` bits for brotli and the real weight shape, solved from record P's 15,975,300-byte model; fp16
scales and passthrough tensors cost 16 bits each. docs/planner.md has the derivation.
"""

from __future__ import annotations

import dataclasses
import math

import torch

import train_gpt

P_MODEL_BYTES = 15_975_300  # record P seed 42: int6 matrices + int8 embedding + fp16, torch.save + brotli-11
P_CODE_BYTES = 16_594  # P's committed self-extracting wrapper
DEFAULT_CODE_BYTES = 17_000  # assumed packed train_gpt.py: P's wrapper plus a little slack
EMBED_NAME = "tok_emb.weight"


def model_params(cfg: train_gpt.Config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of train_gpt.GPT(cfg), built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = train_gpt.GPT(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def component(name: str) -> str:
    if name == EMBED_NAME:
        return "embedding"
    if ".attn." in name and name.endswith(".weight"):
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "block_control" if name.startswith("blocks.") else name.split(".")[0]


def count_params(cfg: train_gpt.Config) -> dict[str, int]:
    """Parameters per component ('embedding', 'attention', 'mlp', 'block_control', top-level tensors) and 'total'."""
    counts: dict[str, int] = {}
    for name, shape in model_params(cfg).items():
        counts[component(name)] = counts.get(component(name), 0) + math.prod(shape)
    counts["total"] = sum(counts.values())
    return counts


def clip_range(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def gaussian_code_entropy(bits: int, clip_sigmas: float) -> float:
    """Entropy (bits) of a unit Gaussian rounded at step clip_sigmas/clip_range and clamped to +-clip_range."""
    r = clip_range(bits)
    step = clip_sigmas / r
    cdf = lambda x: 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))
    h = 0.0
    for k in range(-r, r + 1):
        lo = -math.inf if k == -r else (k - 0.5) * step
        hi = math.inf if k == r else (k + 0.5) * step
        p = cdf(hi) - cdf(lo)
        if p > 0:
            h -= p * math.log2(p)
    return h


def quant_layout(cfg: train_gpt.Config) -> dict[str, dict[str, float]]:
    """How quant/ stores each class of tensor: 2-D tensors above PASSTHROUGH_NUMEL elements become codes (embedding
    at EMBED_BITS, the rest at MATRIX_BITS, with the attention or MLP clip sigmas: the matrix class's entropy is their
    code-weighted mean) plus one fp16 scale per row; everything else is fp16 passthrough. LQER's few KB are left out."""
    out = {"matrix": dict(bits=cfg.matrix_bits, codes=0, scales=0, entropy_sum=0.0),
           "embedding": dict(bits=cfg.embed_bits, clip_sigmas=cfg.embed_clip_sigmas, codes=0, scales=0),
           "passthrough": dict(values=0)}
    for name, shape in model_params(cfg).items():
        n = math.prod(shape)
        if len(shape) != 2 or n <= cfg.passthrough_numel:
            out["passthrough"]["values"] += n
        else:
            cls = out["embedding" if name == EMBED_NAME else "matrix"]
            cls["codes"] += n
            cls["scales"] += shape[0]
            if name != EMBED_NAME:
                sigmas = cfg.attn_clip_sigmas if ".attn." in name else cfg.mlp_clip_sigmas
                cls["entropy_sum"] += n * gaussian_code_entropy(cfg.matrix_bits, sigmas)
    for cls in ("matrix", "embedding"):
        c = out[cls]
        c["raw_bytes"] = c["codes"] * c["bits"] / 8 + 2 * c["scales"]
        c["entropy_bits"] = (c.pop("entropy_sum") / max(1, c["codes"]) if cls == "matrix"
                             else gaussian_code_entropy(c["bits"], c["clip_sigmas"]))
    out["passthrough"]["raw_bytes"] = 2 * out["passthrough"]["values"]
    return out


def record_p_config() -> train_gpt.Config:
    """Record P's quantization-relevant settings (the size calibration point), pinned against default drift."""
    return dataclasses.replace(train_gpt.Config(), vocab_size=8192, num_layers=11, model_dim=512, num_heads=8,
                               num_kv_heads=4, mlp_mult=4.0, num_loops=2, loop_start=3, loop_end=5,
                               skip_gates_enabled=True, matrix_bits=6, attn_clip_sigmas=12.85, mlp_clip_sigmas=12.85,
                               embed_bits=8, embed_clip_sigmas=20.0, passthrough_numel=65_536, parallel_lanes=1,
                               smear_gate_enabled=False, sparse_attn_gate_enabled=False, lqer_enabled=False)


def size_calibration() -> dict[str, float]:
    """Solve delta from P: 8 * P_MODEL_BYTES = sum codes * (H + delta) + 16 * fp16 values."""
    lay = quant_layout(record_p_config())
    codes = lay["matrix"]["codes"] + lay["embedding"]["codes"]
    ideal = sum(lay[c]["codes"] * lay[c]["entropy_bits"] for c in ("matrix", "embedding"))
    fp16 = lay["matrix"]["scales"] + lay["embedding"]["scales"] + lay["passthrough"]["values"]
    delta = (8 * P_MODEL_BYTES - 16 * fp16 - ideal) / codes
    return dict(delta_bits=delta, p_int6_codes=lay["matrix"]["codes"], p_int8_codes=lay["embedding"]["codes"],
                p_fp16_values=fp16, p_int6_bits_per_code=lay["matrix"]["entropy_bits"] + delta,
                p_int8_bits_per_code=lay["embedding"]["entropy_bits"] + delta)


def predict_bytes(cfg: train_gpt.Config, code_bytes: int = DEFAULT_CODE_BYTES) -> dict:
    """Expected compressed artifact bytes for cfg and the headroom against train_gpt.ARTIFACT_LIMIT_BYTES."""
    delta = size_calibration()["delta_bits"]
    lay = quant_layout(cfg)
    classes = {}
    for cls in ("matrix", "embedding"):
        c = lay[cls]
        bpc = c["entropy_bits"] + delta
        classes[cls] = dict(c, bits_per_code=bpc, compressed_bytes=c["codes"] * bpc / 8 + 2 * c["scales"])
    classes["passthrough"] = dict(lay["passthrough"], compressed_bytes=lay["passthrough"]["raw_bytes"])
    model = sum(c["compressed_bytes"] for c in classes.values())
    total = model + code_bytes
    limit = train_gpt.ARTIFACT_LIMIT_BYTES
    return dict(classes=classes, model_bytes=model, code_bytes=code_bytes, total_bytes=total, limit_bytes=limit,
                headroom_bytes=limit - total, fits=total <= limit)
