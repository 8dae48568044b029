"""Quantization benchmark: GPTQ+SDClip int6 vs round-to-nearest int6 vs the upstream int8+zlib baseline.

Run from the repo root: `python bench/quant.py [--scale 0.25]`. Prints compressed bytes per codec against the order-0
entropy bound, reconstruction errors (relative Frobenius error of W and of the layer output XWᵀ, the latter from
the Hessian: ‖X(W−Ŵ)ᵀ‖² = tr(E H Eᵀ)), a packing comparison (int8 containers vs 6-bit packing) and the container
overhead. The synthetic mode builds the record's matrix set with heavy-tailed rows and correlated calibration
activations; `run_benchmark(state, hessians, ...)` is the boundary a trained-checkpoint mode plugs into.
The full scale takes ~12 min on 2 busy CPU cores (GPTQ ~75 s, then ~1 min per codec per artifact).
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quant import (  # noqa: E402
    ARTIFACT_CODECS,
    QTensor,
    byte_shuffle,
    compress_bytes,
    decode_artifact,
    dequantize,
    encode_artifact,
    quantize_state_dict,
)
from quant.__main__ import order0_bits  # noqa: E402


def pack_int6(q: Tensor) -> bytes:
    """6-bit two's complement, 4 symbols -> 3 bytes (little-endian 24-bit words). Measured here, not shipped."""
    u = q.reshape(-1).to(torch.int32) & 63
    u = torch.cat([u, u.new_zeros(-len(u) % 4)]).reshape(-1, 4)
    word = u[:, 0] | (u[:, 1] << 6) | (u[:, 2] << 12) | (u[:, 3] << 18)
    return torch.stack([word & 255, (word >> 8) & 255, word >> 16], 1).to(torch.uint8).numpy().tobytes()


def synthetic_activations(n: int, d: int, gen: torch.Generator, mlp_hidden: bool = False) -> Tensor:
    """Correlated activations [n, d]: decaying spectrum, log-normal channel scales, a few outlier channels;
    `mlp_hidden` applies LeakyReLU(0.5)² like the record's MLP (non-negative, mean-shifted, more correlated)."""
    mix = torch.randn(d, d, generator=gen) / d**0.5
    spectrum = torch.logspace(0, -2, d).sqrt()
    x = (torch.randn(n, d, generator=gen) * spectrum) @ mix.T
    x = x * torch.exp(0.5 * torch.randn(d, generator=gen))
    x[:, torch.randperm(d, generator=gen)[: max(1, d // 64)]] *= 8.0  # outlier channels
    return torch.nn.functional.leaky_relu(x, 0.5).square() if mlp_hidden else x


def synthetic_weight(rows: int, cols: int, gen: torch.Generator, df: float = 4.0) -> Tensor:
    """Student-t(df) rows with unit std times a log-normal per-row σ around 0.03 (heavy tails, varied row scales)."""
    t = torch.distributions.StudentT(df).sample((rows, cols)) / (df / (df - 2)) ** 0.5
    return t * (0.03 * torch.exp(0.3 * torch.randn(rows, 1, generator=gen)))


def synthetic_model(scale: float, seed: int, layers: int = 11) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The record's shapes (11 layers: c_q 512×512, c_k/c_v 256×512, proj 512×512, fc 2048×512, mlp.proj 512×2048;
    tok_emb 8192×512; small control tensors), every dimension times `scale`, and Hessians from synthetic activations."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    d, kv, hid, vocab = (max(8, round(n * scale)) for n in (512, 256, 2048, 8192))
    n_tok = 2 * hid
    state, hessians = {"tok_emb.weight": synthetic_weight(vocab, d, gen).bfloat16()}, {}
    for i in range(layers):
        p = f"blocks.{i}."
        shapes = {"attn.c_q": (d, d), "attn.c_k": (kv, d), "attn.c_v": (kv, d), "attn.proj": (d, d),
                  "mlp.fc": (hid, d), "mlp.proj": (d, hid)}
        acts = {"attn": synthetic_activations(n_tok, d, gen), "attn.proj": synthetic_activations(n_tok, d, gen),
                "mlp.fc": synthetic_activations(n_tok, d, gen),
                "mlp.proj": synthetic_activations(n_tok, hid, gen, mlp_hidden=True)}
        for name, (r, c) in shapes.items():
            state[p + name + ".weight"] = synthetic_weight(r, c, gen)
            x = acts["attn"] if name in ("attn.c_q", "attn.c_k", "attn.c_v") else acts[name]
            hessians[p + name + ".weight"] = x.T @ x / n_tok
        state[p + "attn.q_gain"] = torch.full((8,), 5.25)
        state[p + "attn_scale"] = 1 + 0.1 * torch.randn(d, generator=gen)
        state[p + "mlp_scale"] = 1 + 0.1 * torch.randn(d, generator=gen)
        state[p + "resid_mix"] = torch.stack([torch.ones(d), torch.zeros(d)]) + 0.05 * torch.randn(2, d, generator=gen)
    state["skip_weights"] = torch.ones(layers // 2, d) + 0.1 * torch.randn(layers // 2, d, generator=gen)
    x = synthetic_activations(n_tok, d, gen)
    hessians["tok_emb.weight"] = x.T @ x / n_tok
    return state, hessians


def baseline_int8(state: dict[str, Tensor], passthrough_numel: int) -> tuple[dict[str, Tensor], int]:
    """Root baseline export: per-row int8, clip at the 99.99984th percentile of |w|, scale = clip/127 (≥ 1/127), fp16
    scales, small tensors fp16; zlib level 9 over the raw codes + scales + passthrough (not torch.save's framing)."""
    deq, parts = {}, []
    for name, w in state.items():
        if w.ndim != 2 or w.numel() <= passthrough_numel:
            parts.append(w.half().numpy().tobytes())
            deq[name] = w.half().to(w.dtype)
            continue
        clip = torch.quantile(w.float().abs(), 0.9999984, dim=1)
        s = (clip / 127).clamp_min(1 / 127).half()
        q = torch.round(torch.clamp(w.float(), -clip[:, None], clip[:, None]) / s.float()[:, None]).clamp(-127, 127)
        parts += [q.to(torch.int8).numpy().tobytes(), s.numpy().tobytes()]
        deq[name] = (q * s.float()[:, None]).to(w.dtype)
    return deq, len(zlib.compress(b"".join(parts), 9))


def errors(state: dict[str, Tensor], deq: dict[str, Tensor], hessians: dict[str, Tensor], names: list[str]) -> str:
    """Mean over `names` of the relative Frobenius error of W and of the layer output (via tr(E H Eᵀ))."""
    ew, eo = [], []
    for n in names:
        w, e = state[n].float(), state[n].float() - deq[n].float()
        ew.append((e.norm() / w.norm()).item())
        H = hessians[n]
        eo.append(((e @ H * e).sum() / (w @ H * w).sum()).sqrt().item())
    return f"{sum(ew) / len(ew):.4f} / {sum(eo) / len(eo):.4f}"


def order0_bound(qts: list[QTensor]) -> float:
    """Order-0 entropy bound in bytes: codes + fp16 scales + passthrough values, each tensor separately."""
    bits = 0.0
    for qt in qts:
        bits += order0_bits(qt.data) if qt.kind == "passthrough" else order0_bits(qt.codes) + order0_bits(qt.scale)
    return bits / 8


def run_benchmark(state: dict[str, Tensor], hessians: dict[str, Tensor], codecs: tuple[str, ...],
                  packing_sample: int, passthrough_numel: int = 65536) -> None:
    """Benchmark a state dict with Hessians for all its quantized matrices (synthetic or, later, a trained
    checkpoint's) and print the tables."""
    mats = [n for n, w in state.items() if w.ndim == 2 and w.numel() > passthrough_numel and n != "tok_emb.weight"]
    embed = [n for n in ("tok_emb.weight",) if n in state]
    nparams = sum(w.numel() for w in state.values())
    print(f"{len(state)} tensors, {nparams:,} parameters ({len(mats)} matrices + {len(embed)} embedding quantized)")
    results = {}
    for method in ("gptq", "rtn"):
        t = time.perf_counter()
        qts = quantize_state_dict(state, hessians, method=method, passthrough_numel=passthrough_numel)
        print(f"{method}: quantized in {time.perf_counter() - t:.1f} s", flush=True)
        sizes = {}
        for codec in codecs:
            t = time.perf_counter()
            blob = encode_artifact(qts, codec)
            sizes[codec] = (len(blob), time.perf_counter() - t)
            assert all(torch.equal(a.codes, b.codes) for a, b in zip(qts, decode_artifact(blob), strict=True)
                       if a.kind != "passthrough")
        results[method] = (qts, sizes, order0_bound(qts))
    deq_base, base_bytes = baseline_int8(state, passthrough_numel)

    print("\n== methods (bytes = whole artifact; errors = mean relative Frobenius error of W / of the output XWᵀ) ==")
    head = ["method", *[f"{c} bytes (÷bound)" for c in codecs], "order-0 bound", "matrices W / XWᵀ err",
            "embedding W / XWᵀ err"]
    rows = []
    for method, label in (("gptq", "GPTQ+SDClip int6 (emb int8)"), ("rtn", "RTN int6 same scales (emb int8)")):
        qts, sizes, bound = results[method]
        deq = dequantize(qts)
        rows.append([label, *[f"{sizes[c][0]:,} ({sizes[c][0] / bound:.3f})" for c in codecs], f"{bound:,.0f}",
                     errors(state, deq, hessians, mats), errors(state, deq, hessians, embed) if embed else "-"])
    rows.append(["baseline int8 q99.99984 + zlib-9", *[""] * (len(codecs) - 1), f"{base_bytes:,} (zlib-9)", "-",
                 errors(state, deq_base, hessians, mats), errors(state, deq_base, hessians, embed) if embed else "-"])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))
    print("compress time (s): " + ", ".join(f"{m} {c} {results[m][1][c][1]:.1f}" for m in results for c in codecs))

    qts = results["gptq"][0]
    int6 = torch.cat([qt.codes.reshape(-1) for qt in qts if qt.kind != "passthrough" and qt.bits == 6])[:packing_sample]
    h0 = order0_bits(int6) / 8
    print(f"\n== packing of GPTQ int6 codes: first {int6.numel():,} symbols, order-0 bound {h0:,.0f} bytes "
          f"({8 * h0 / int6.numel():.3f} bits/symbol); bytes (÷bound) ==")
    raw = int6.numpy().tobytes()
    layouts = {"int8 container": raw, "int8 + shuffle(2)": byte_shuffle(raw, 2), "6-bit packed 4->3": pack_int6(int6)}
    for name, data in layouts.items():
        sizes = [len(compress_bytes(data, c)) for c in codecs]
        print(f"{name:20s} " + "  ".join(f"{c} {n:,} ({n / h0:.3f})" for c, n in zip(codecs, sizes, strict=True)),
              flush=True)
    scales = b"".join(qt.scale.numpy().tobytes() for qt in qts if qt.kind != "passthrough")
    print(f"{'fp16 scales':20s} " + "  ".join(
        f"{c} raw {len(compress_bytes(scales, c)):,} / shuffle(2) {len(compress_bytes(byte_shuffle(scales, 2), c)):,}"
        for c in codecs))

    codec = codecs[0]
    codes = b"".join(qt.codes.numpy().tobytes() for qt in qts if qt.kind != "passthrough")
    side = byte_shuffle(b"".join(qt.scale.numpy().tobytes() if qt.kind != "passthrough"
                                 else qt.data.reshape(-1).view(torch.uint8).numpy().tobytes() for qt in qts), 2)
    alone = len(compress_bytes(codes, codec))
    side_alone = len(compress_bytes(side, codec))
    total = results["gptq"][1][codec][0]
    print(f"\n== container overhead ({codec}) ==\nartifact {total:,} bytes vs codes compressed alone {alone:,} "
          f"(+{100 * (total / alone - 1):.2f}%) vs codes alone + side alone {alone + side_alone:,} "
          f"(+{100 * (total / (alone + side_alone) - 1):.2f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every synthetic dimension by this (1.0 = the record's 35.9M parameters)")
    parser.add_argument("--layers", type=int, default=11, help="number of synthetic transformer layers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights and activations")
    parser.add_argument("--codecs", default=",".join(ARTIFACT_CODECS),
                        help="comma-separated codecs to measure, first one used for the container check")
    parser.add_argument("--packing-sample", type=int, default=4_000_000,
                        help="int6 symbols used for the packing comparison (brotli-11 takes ~3 s per million)")
    args = parser.parse_args()
    codecs = tuple(c for c in args.codecs.split(",") if c)
    bad = [c for c in codecs if c not in ARTIFACT_CODECS]
    if bad or not codecs or args.scale <= 0 or args.layers < 1:
        parser.error(f"need codecs from {ARTIFACT_CODECS} (got {bad or codecs}), --scale > 0 and --layers >= 1")
    t = time.perf_counter()
    state, hessians = synthetic_model(args.scale, args.seed, args.layers)
    print(f"synthetic model (scale {args.scale}, seed {args.seed}) built in {time.perf_counter() - t:.1f} s")
    # the passthrough threshold (65,536 elements) shrinks with the matrices so the same tensors stay quantized
    run_benchmark(state, hessians, codecs, args.packing_sample, passthrough_numel=round(65536 * args.scale**2))


if __name__ == "__main__":
    main()
