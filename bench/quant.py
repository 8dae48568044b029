"""Quantization benchmark: GPTQ+SDClip int6 vs round-to-nearest int6 vs the upstream int8+zlib baseline; LQER and
per-role bits on and off; a codec study of layouts x compressors.

Run from the repo root as a module (`python bench/quant.py` would let this file shadow the quant package):
`python -m bench.quant --checkpoint runs/bench/ref/final_model.pt` (a trained checkpoint with its run_summary.json
beside it) or `python -m bench.quant [--scale 0.25]` (synthetic weights). Prints, as markdown: compressed bytes per
method and quantized val_bpb with its gap to the float model (checkpoint mode: the trainer's model and plain
`train_gpt.evaluate`); every codec's bytes against the order-0 entropy bound; reconstruction errors (relative Frobenius
error of W and of the layer output XWᵀ, the latter from the Hessian: ‖X(W−Ŵ)ᵀ‖² = tr(E H Eᵀ)); a packing comparison
(int8 containers vs 6-bit packing) and the container overhead; then GPTQ with and without LQER, with the run's and
with record N's per-role bits and sigmas, side by side (bytes, val_bpb, gap).
`--codec-study` instead measures the GPTQ payload under row-major / column-major / reordered-rows layouts with every
compressor installed here (brotli, zstd, lzma, and when present pyppmd, bz3, zpaq from PyPI and lrzip from Debian):
bytes, compress and decompress seconds.
The synthetic mode builds the record's matrix set with heavy-tailed rows, varied row and column scales and correlated
calibration activations; its full scale takes ~12 min on 2 busy CPU cores (GPTQ ~75 s, then ~1 min per codec per
artifact). The checkpoint mode collects Hessians like the trainer (GPTQ_CALIBRATION_BATCHES batches of the run's
loader and seed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bench.common import md_table, progress
from quant import (
    ARTIFACT_CODECS,
    ArtifactError,
    QTensor,
    byte_shuffle,
    compress_bytes,
    compress_payload,
    decode_artifact,
    dequantize,
    encode_artifact,
    load_artifact,
    quantize_state_dict,
    save_artifact,
)
from quant.__main__ import order0_bits

Scorer = Callable[[dict[str, Tensor]], float]  # a (dequantized) state dict -> val_bpb
CODEC_LABEL = {"zlib": "zlib-9", "brotli": "brotli-11", "zstd": "zstd-22", "lzma": "lzma-9e", "rans": "rans (order-0)"}


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


def synthetic_weight(rows: int, cols: int, gen: torch.Generator, df: float = 4.0, col_sigma: float = 0.1) -> Tensor:
    """Student-t(df) rows with unit std times a log-normal per-row σ around 0.03 and a log-normal per-column factor
    (σ of its log `col_sigma`): heavy tails, varied row scales and input channels of varied weight. A trained cpu_tiny
    checkpoint measures log-σ 0.03-0.25 across columns (0.2-0.25 for mlp.proj, whose inputs are the MLP hidden units)."""
    t = torch.distributions.StudentT(df).sample((rows, cols)) / (df / (df - 2)) ** 0.5
    col = torch.exp(col_sigma * torch.randn(1, cols, generator=gen))
    return t * col * (0.03 * torch.exp(0.3 * torch.randn(rows, 1, generator=gen)))


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
            state[p + name + ".weight"] = synthetic_weight(r, c, gen, col_sigma=0.25 if name == "mlp.proj" else 0.1)
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


def baseline_int8(state: dict[str, Tensor], passthrough_numel: int) -> tuple[dict[str, Tensor], bytes, float]:
    """Root baseline export (upstream's root train_gpt.py): per-row int8, clip at the 99.99984th percentile of |w|,
    scale = clip/127 (≥ 1/127), fp16 scales; smaller tensors fp16 (upstream keeps a few control tensors fp32: a few KB
    at most).
    Returns the dequantized state, the raw payload (codes + scales + passthrough, without torch.save's framing; the
    baseline compresses it with zlib-9) and its order-0 entropy bound in bytes."""
    deq, parts, bits = {}, [], 0.0
    for name, w in state.items():
        if w.ndim != 2 or w.numel() <= passthrough_numel:
            parts.append(w.half().numpy().tobytes())
            deq[name] = w.half().to(w.dtype)
            bits += order0_bits(w.half())
            continue
        clip = torch.quantile(w.float().abs(), 0.9999984, dim=1)
        s = (clip / 127).clamp_min(1 / 127).half()
        q = torch.round(torch.clamp(w.float(), -clip[:, None], clip[:, None]) / s.float()[:, None]).clamp(-127, 127)
        q = q.to(torch.int8)
        parts += [q.numpy().tobytes(), s.numpy().tobytes()]
        deq[name] = (q.float() * s.float()[:, None]).to(w.dtype)
        bits += order0_bits(q) + order0_bits(s)
    return deq, b"".join(parts), bits / 8


def errors(state: dict[str, Tensor], deq: dict[str, Tensor], hessians: dict[str, Tensor],
           names: list[str]) -> tuple[str, str]:
    """Mean over `names` of the relative Frobenius error of W and of the layer output (via tr(E H Eᵀ))."""
    if not names:
        return "-", "-"
    ew, eo = [], []
    for n in names:
        w, e = state[n].float(), state[n].float() - deq[n].float()
        ew.append((e.norm() / w.norm()).item())
        H = hessians[n]
        eo.append(((e @ H * e).sum() / (w @ H * w).sum()).sqrt().item())
    return f"{sum(ew) / len(ew):.4f}", f"{sum(eo) / len(eo):.4f}"


def order0_bound(qts: list[QTensor]) -> float:
    """Order-0 entropy bound in bytes: codes + fp16 scales + passthrough values, each tensor separately."""
    bits = 0.0
    for qt in qts:
        bits += order0_bits(qt.data) if qt.kind == "passthrough" else order0_bits(qt.codes) + order0_bits(qt.scale)
    return bits / 8


def _cell(n: int, bound: float) -> str:
    return f"{n:,} ({n / bound:.3f})"


def run_benchmark(state: dict[str, Tensor], hessians: dict[str, Tensor], codecs: tuple[str, ...],
                  packing_sample: int, passthrough_numel: int = 65536, score: Scorer | None = None,
                  float_bpb: float | None = None, quant_kwargs: dict | None = None) -> str:
    """Benchmark a state dict with Hessians for all its quantized matrices (synthetic or a trained checkpoint's);
    returns the markdown tables. With `score` (and the float model's `float_bpb`) every method is also scored."""
    quant_kwargs = quant_kwargs or {}
    mats = [n for n, w in state.items() if w.ndim == 2 and w.numel() > passthrough_numel and n != "tok_emb.weight"]
    embed = [n for n in ("tok_emb.weight",) if n in state and state[n].numel() > passthrough_numel]
    nparams = sum(w.numel() for w in state.values())
    out = [f"{len(state)} tensors, {nparams:,} parameters; quantized: {len(mats)} matrices (int"
           f"{quant_kwargs.get('matrix_bits', 6)}) + {len(embed)} embedding (int{quant_kwargs.get('embed_bits', 8)}), "
           f"the rest fp16 passthrough (≤ {passthrough_numel:,} elements)."]
    results = {}
    for method in ("gptq", "rtn"):
        t = time.perf_counter()
        qts = quantize_state_dict(state, hessians, method=method, passthrough_numel=passthrough_numel, **quant_kwargs)
        progress(f"{method}: quantized in {time.perf_counter() - t:.1f} s")
        sizes = {}
        for codec in codecs:
            t = time.perf_counter()
            blob = encode_artifact(qts, codec)
            sizes[codec] = (len(blob), time.perf_counter() - t)
            assert all(torch.equal(a.codes, b.codes) for a, b in zip(qts, decode_artifact(blob), strict=True)
                       if a.kind != "passthrough")
        results[method] = (qts, dequantize(qts), sizes, order0_bound(qts))
    deq_base, base_payload, base_bound = baseline_int8(state, passthrough_numel)
    base_sizes = {"zlib": len(zlib.compress(base_payload, 9))}
    for codec in codecs:
        base_sizes[codec] = len(compress_bytes(base_payload, codec))
    progress("baseline int8: quantized and compressed")

    labels = {"gptq": "GPTQ+SDClip int6 (emb int8)", "rtn": "RTN int6, same SDClip scales (emb int8)",
              "base": "baseline int8 per-row q99.99984 + zlib-9"}
    deqs = {"gptq": results["gptq"][1], "rtn": results["rtn"][1], "base": deq_base}
    bpb = {}
    if score is not None:
        for key, deq in deqs.items():
            t = time.perf_counter()
            bpb[key] = score(deq)
            progress(f"{key}: val_bpb {bpb[key]:.5f} ({time.perf_counter() - t:.1f} s)")
    gap = {k: v - float_bpb for k, v in bpb.items()} if float_bpb is not None else {}

    c0 = codecs[0]
    head = ["method", "artifact bytes"]
    if bpb:
        head += ["val_bpb", "gap to float", "gap / GPTQ gap"]
    head += ["matrices: W err", "XWᵀ err", "embedding: W err", "XWᵀ err"]
    rows = []
    if bpb:
        rows.append(["float checkpoint (fp32)", f"{4 * nparams:,} raw", f"{float_bpb:.5f}", "0", "-", "-", "-", "-",
                     "-"])
    for key in ("gptq", "rtn", "base"):
        nbytes = f"{results[key][2][c0][0]:,} ({CODEC_LABEL[c0]})" if key != "base" else f"{base_sizes['zlib']:,} (zlib-9)"
        row = [labels[key], nbytes]
        if bpb:
            row += [f"{bpb[key]:.5f}", f"{gap[key]:+.5f}", f"{gap[key] / gap['gptq']:.2f}" if gap["gptq"] else "-"]
        rows.append(row + [*errors(state, deqs[key], hessians, mats), *errors(state, deqs[key], hessians, embed)])
    out += ["", md_table(head, rows, "l" + "r" * (len(head) - 1))]
    if bpb and gap["gptq"] and gap["rtn"]:
        out += ["", f"**GPTQ gap / RTN gap = {gap['gptq'] / gap['rtn']:.3f}** (quantized val_bpb minus float val_bpb; "
                f"below 1 = GPTQ loses less); baseline int8 gap / GPTQ gap = {gap['base'] / gap['gptq']:.2f}; "
                f"GPTQ artifact / baseline bytes = {results['gptq'][2][c0][0] / base_sizes['zlib']:.3f}."]
    out += ["", "Errors: mean relative Frobenius error of W and of the layer output XWᵀ (from the calibration Hessian)."]

    heads = ["method", "order-0 bound (bytes)", *[f"{CODEC_LABEL[c]} (÷ bound)" for c in ("zlib", *codecs)]]
    rows = [[labels[k], f"{results[k][3]:,.0f}", "-", *[_cell(results[k][2][c][0], results[k][3]) for c in codecs]]
            for k in ("gptq", "rtn")]
    rows.append([labels["base"].removesuffix(" + zlib-9") + " (raw payload)", f"{base_bound:,.0f}",
                 *[_cell(base_sizes[c], base_bound) for c in ("zlib", *codecs)]])
    out += ["", "Every codec against the order-0 entropy bound (sum over tensors of the codes' and the fp16 scales' / "
            "passthrough values' empirical entropy). GPTQ/RTN bytes are whole artifacts (header + manifest + "
            "payload); the baseline's is its raw payload compressed.", "", md_table(heads, rows)]
    g = results["gptq"]
    out += ["", "**Bytes ÷ order-0 bound** (GPTQ artifact): " + ", ".join(
        f"{CODEC_LABEL[c]} {g[2][c][0] / g[3]:.3f}" for c in codecs) + f"; baseline payload zlib-9 "
        f"{base_sizes['zlib'] / base_bound:.3f}."]
    out.append("\nCompress time (s): " + ", ".join(f"{m} {CODEC_LABEL[c]} {results[m][2][c][1]:.1f}"
                                                    for m in ("gptq", "rtn") for c in codecs))

    qts = results["gptq"][0]
    int6 = torch.cat([qt.codes.reshape(-1) for qt in qts if qt.kind != "passthrough" and qt.bits == 6])[:packing_sample]
    h0 = order0_bits(int6) / 8
    raw = int6.numpy().tobytes()
    layouts = {"int8 container": raw, "int8 + shuffle(2)": byte_shuffle(raw, 2), "6-bit packed 4->3": pack_int6(int6)}
    rows = [[name, *[_cell(len(compress_bytes(data, c)), h0) for c in codecs]] for name, data in layouts.items()]
    progress("packing comparison done")
    scales = b"".join(qt.scale.numpy().tobytes() for qt in qts if qt.kind != "passthrough")
    rows.append(["fp16 scales raw / shuffle(2) (bytes)", *[
        f"{len(compress_bytes(scales, c)):,} / {len(compress_bytes(byte_shuffle(scales, 2), c)):,}" for c in codecs]])
    out += ["", f"Packing of the GPTQ int6 codes: {int6.numel():,} symbols, order-0 bound {h0:,.0f} bytes "
            f"({8 * h0 / int6.numel():.3f} bits/symbol); bytes (÷ bound):", "",
            md_table(["layout", *[CODEC_LABEL[c] for c in codecs]], rows)]

    codes = b"".join(qt.codes.numpy().tobytes() for qt in qts if qt.kind != "passthrough")
    side = byte_shuffle(b"".join(qt.scale.numpy().tobytes() if qt.kind != "passthrough"
                                 else qt.data.reshape(-1).view(torch.uint8).numpy().tobytes() for qt in qts), 2)
    alone = len(compress_bytes(codes, c0))
    side_alone = len(compress_bytes(side, c0))
    total = results["gptq"][2][c0][0]
    out += ["", f"Container overhead ({CODEC_LABEL[c0]}): artifact {total:,} bytes vs codes compressed alone {alone:,} "
            f"(+{100 * (total / alone - 1):.2f}%) vs codes alone + side alone {alone + side_alone:,} "
            f"(+{100 * (total / (alone + side_alone) - 1):.2f}%)."]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- LQER


def bench_roles(state: dict[str, Tensor], passthrough_numel: int) -> dict[str, str]:
    """Quantization roles of the trainer's tensor names (the bench is a caller: it may route by name; quant/ does not)."""
    roles = {}
    for name, w in state.items():
        if w.is_floating_point() and w.ndim == 2 and w.numel() > passthrough_numel:
            roles[name] = ("embed" if name == "tok_emb.weight" else "attn" if ".attn." in name
                           else "mlp" if ".mlp." in name else "matrix")
    return roles


N_ROLE_KWARGS = {"embed_bits": 7, "embed_clip_sigmas": 14.0, "attn_clip_sigmas": 13.0, "mlp_clip_sigmas": 11.5}


def lqer_benchmark(state: dict[str, Tensor], hessians: dict[str, Tensor], codec: str, passthrough_numel: int,
                   score: Scorer | None, float_bpb: float | None, quant_kwargs: dict, lqer: dict) -> str:
    """GPTQ with and without LQER, with the run's settings and with record N's per-role bits/sigmas, side by side:
    artifact bytes and (with `score`) quantized val_bpb and its gap to the float model."""
    roles = bench_roles(state, passthrough_numel)
    n_kw = {**quant_kwargs, **N_ROLE_KWARGS, "roles": roles}
    arms = [("GPTQ, the run's settings", quant_kwargs), ("GPTQ + LQER", {**quant_kwargs, **lqer}),
            ("GPTQ, N's roles (emb int7 14σ, attn 13σ, mlp 11.5σ)", n_kw), ("GPTQ, N's roles + LQER", {**n_kw, **lqer})]
    rows, res = [], []
    for label, kw in arms:
        t = time.perf_counter()
        qts = quantize_state_dict(state, hessians, passthrough_numel=passthrough_numel, **kw)
        qs = time.perf_counter() - t
        blob = encode_artifact(qts, codec)
        back = decode_artifact(blob)
        assert all((a.lqer is None) == (b.lqer is None) for a, b in zip(qts, back, strict=True))
        bpb = score(dequantize(back)) if score is not None else None
        fixed = [qt.name for qt in qts if qt.lqer is not None]
        progress(f"lqer bench: {label}: {len(blob):,} bytes" + (f", val_bpb {bpb:.5f}" if bpb is not None else "")
                 + f" (quantize {qs:.1f} s)")
        res.append((len(blob), bpb))
        base_bytes, base_bpb = res[0] if "roles" not in kw else res[2]
        row = [label, f"{len(blob):,}", f"{len(blob) - base_bytes:+,}"]
        if bpb is not None:
            gap, base_gap = bpb - float_bpb, base_bpb - float_bpb
            row += [f"{bpb:.5f}", f"{gap:+.5f}", f"{gap / base_gap:.3f}" if base_gap else "-"]
        rows.append(row + [", ".join(fixed) or "-", f"{qs:.1f}"])
    head = ["arm", f"artifact bytes ({CODEC_LABEL[codec]})", "Δ bytes vs its arm without LQER"]
    if score is not None:
        head += ["val_bpb", "gap to float", "gap ÷ gap without LQER"]
    head += ["LQER tensors", "quantize s"]
    out = [f"LQER (rank {lqer['lqer_rank']}, top {lqer['lqer_top_k']} tensors by ‖W − q·s‖_F, INT4 group "
           f"{lqer['lqer_group']}) on and off, with the run's bits/sigmas and with record N's per-role ones; every "
           f"artifact is decoded again before scoring.", "", md_table(head, rows, "l" + "r" * (len(head) - 3) + "lr")]
    if score is not None and res[0][1] is not None:
        d0, d1 = res[1][1] - res[0][1], res[3][1] - res[2][1]
        out += ["", f"**LQER: val_bpb {d0:+.5f} for {res[1][0] - res[0][0]:+,} bytes (run's settings); {d1:+.5f} for "
                f"{res[3][0] - res[2][0]:+,} bytes (N's roles)** (negative = better)."]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- codec study


def nn_chain_order(codes: Tensor) -> Tensor:
    """Greedy nearest-neighbour chain of rows from row 0 (record N1's row reordering, PR #1797 lineage), as int64.
    N1 chains by L1 distance; this uses squared L2 from one matmul (an L1 chain is ~30× slower on CPU)."""
    x = codes.float()
    sq = (x * x).sum(1)
    d = sq[:, None] + sq[None, :] - 2 * (x @ x.T)
    d[:, 0] = float("inf")
    order, cur = [0], 0
    for _ in range(len(x) - 1):
        cur = int(d[cur].argmin())
        order.append(cur)
        d[:, cur] = float("inf")
    return torch.tensor(order)


def study_streams(qts: list[QTensor], reorder: bool, column_major: bool) -> tuple[bytes, list[int], bytes, bytes]:
    """(codes, segments, side, permutations) of an artifact's payload with rows reordered and/or matrices written
    column-major: the codes of every quantized tensor (segment lengths), the side region (fp16 scales in the same row
    order, passthrough data) byte-shuffled as in the artifact, and the permutations as uint16 per reordered matrix
    (compressed separately). LQER factors are left out (the study runs on plain GPTQ codes)."""
    codes, segments, side, perms = [], [], [], []
    for qt in qts:
        if qt.kind == "passthrough":
            side.append(qt.data.reshape(-1).view(torch.uint8).numpy().tobytes())
            continue
        q, s = qt.codes, qt.scale
        if reorder and q.shape[0] <= 65536:
            perm = nn_chain_order(q)
            q, s = q[perm], s[perm]
            perms.append(perm.to(torch.int32).numpy().astype("<u2").tobytes())
        codes.append((q.T if column_major else q).contiguous().numpy().tobytes())
        segments.append(q.numel())
        side.append(s.contiguous().numpy().tobytes())
    return b"".join(codes), segments, byte_shuffle(b"".join(side), 2), b"".join(perms)


def _lrzip(data: bytes, decompress: bool) -> bytes:
    """lrzip works on files: compress with its ZPAQ back-end at level 9 (record N1's `lrzip -z -L 9`), or decompress."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / ("in.lrz" if decompress else "in"), Path(d) / ("out" if decompress else "out.lrz")
        src.write_bytes(data)
        args = ["-d"] if decompress else ["-z", "-L", "9"]
        subprocess.run(["lrzip", "-q", "-f", *args, "-o", str(dst), str(src)], check=True, capture_output=True)
        return dst.read_bytes()


def study_codecs() -> dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]:
    """Every compressor measured by the codec study that is importable or installed here: name -> (compress,
    decompress). Optional ones (pyppmd, bz3, zpaq from PyPI; lrzip from Debian) are skipped when missing."""
    import lzma
    import shutil

    import brotli
    import zstandard
    codecs: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
        "brotli-11 (lgwin 22)": (lambda d: brotli.compress(d, quality=11), brotli.decompress),
        "brotli-11 lgwin 24": (lambda d: brotli.compress(d, quality=11, lgwin=24), brotli.decompress),
        "zstd-22": (lambda d: zstandard.ZstdCompressor(level=22).compress(d),
                    lambda d: zstandard.ZstdDecompressor().decompress(d)),
        "zstd-22 long (wlog 27)": (
            lambda d: zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters.from_level(
                22, window_log=27, enable_ldm=True)).compress(d),
            lambda d: zstandard.ZstdDecompressor(max_window_size=1 << 27).decompress(d)),
        "lzma-9e": (lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
        "lzma-9e lc0 lp0 pb0": (
            lambda d: lzma.compress(d, filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME,
                                                 "lc": 0, "lp": 0, "pb": 0}]), lzma.decompress),
    }
    try:
        import pyppmd
        for order in (2, 3, 4):
            codecs[f"ppmd7 order {order} (pyppmd)"] = (
                lambda d, o=order: pyppmd.compress(d, max_order=o, mem_size=1 << 28),
                lambda d, o=order: pyppmd.decompress(d, max_order=o, mem_size=1 << 28))
    except ImportError:
        progress("codec study: pyppmd not installed, skipped")
    try:
        import bz3
        codecs["bzip3 16 MiB blocks (bz3)"] = (lambda d: bz3.compress(d, block_size=16 << 20), bz3.decompress)
    except ImportError:
        progress("codec study: bz3 (PyPI bzip3) not installed, skipped")
    try:
        import zpaq
        for level in (3, 4, 5):
            codecs[f"zpaq -m{level} (PyPI zpaq, 1 thread)"] = (
                lambda d, lv=level: zpaq.compress(d, level=lv, threads=1), lambda d: zpaq.decompress(d, threads=1))
    except ImportError:
        progress("codec study: zpaq (PyPI) not installed, skipped")
    if shutil.which("lrzip"):
        codecs["lrzip -z -L 9 (ZPAQ back-end, Debian)"] = (lambda d: _lrzip(d, False), lambda d: _lrzip(d, True))
    return codecs


STUDY_LAYOUTS = {"row-major (today)": (False, False), "column-major": (False, True),
                 "rows reordered": (True, False), "rows reordered + column-major": (True, True)}


def _rans_study_pair(codes: bytes, segments: list[int], side: bytes) -> tuple[Callable[[bytes], bytes],
                                                                           Callable[[bytes], bytes]]:
    """(compress, decompress) of pgolf's "rans" payload for the study: the compressor ignores its argument (it codes
    `codes` segment by segment and brotli's `side`) and returns the payload; the decompressor returns codes + side."""
    import brotli

    from quant.rans import rans_decode
    params: dict = {}

    def comp(_: bytes) -> bytes:
        blob, extra = compress_payload(codes, segments, side, "rans")
        params.update(extra["rans"])
        return blob

    def decomp(blob: bytes) -> bytes:
        wb, tb, lanes = params["words_bytes"], params["tables_bytes"], params["lanes"]
        tail = brotli.decompress(blob[wb:])
        out = rans_decode(tail[:tb], tail[tb:tb + 4 * lanes], blob[:wb], segments, lanes)
        return out.tobytes() + tail[tb + 4 * lanes:]

    return comp, decomp


def codec_study(qts: list[QTensor], only: tuple[str, ...] = (), slow_layouts: tuple[str, ...] = (),
                layouts: tuple[str, ...] = (), base: int | None = None) -> str:
    """Bytes, compress and decompress seconds of the GPTQ payload under every layout x compressor, against today's
    brotli-11 row-major artifact payload. Compressors whose name contains a string of `slow_layouts`'s are run on
    the row-major and column-major layouts only (the reordered layouts are measured with the others). `layouts`
    restricts the layouts; `base` gives today's bytes when the first measurement is not today's layout and codec."""
    import brotli
    codecs = {k: v for k, v in study_codecs().items() if not only or any(o in k for o in only)}
    rows = []
    for lname, (reorder, colmajor) in STUDY_LAYOUTS.items():
        if layouts and lname not in layouts:
            continue
        t = time.perf_counter()
        codes, segments, side, perms = study_streams(qts, reorder, colmajor)
        payload = codes + side
        layout_s = time.perf_counter() - t
        perm_bytes = len(brotli.compress(perms, quality=11)) if perms else 0
        progress(f"codec study: layout {lname}: {len(payload):,} bytes, permutations {len(perms):,} raw / "
                 f"{perm_bytes:,} brotli ({layout_s:.1f} s)")
        rans = _rans_study_pair(codes, segments, side)
        for cname, (comp, decomp) in {**codecs, "pgolf rans (order-0 table per tensor) + brotli-11 side": rans}.items():
            if (reorder and any(sl in cname for sl in slow_layouts)) or (only and cname.startswith("pgolf rans")
                                                                         and not any(o in cname for o in only)):
                continue
            t = time.perf_counter()
            blob = comp(payload)
            ct = time.perf_counter() - t
            t = time.perf_counter()
            try:
                ok = decomp(blob) == payload
            except Exception as e:  # a third-party codec that cannot read its own output is a result, not a crash
                progress(f"  {cname}: decompress raised {type(e).__name__}: {e}")
                ok = False
            dt = time.perf_counter() - t
            total = len(blob) + perm_bytes
            if base is None:
                base = total
            progress(f"  {cname}: {total:,} bytes ({total - base:+,}), compress {ct:.1f} s, decompress {dt:.1f} s"
                     + ("" if ok else " ROUND TRIP FAILED"))
            rows.append([lname, cname, f"{total:,}", f"{total - base:+,}", f"{100 * (total / base - 1):+.2f}%",
                         f"{ct + (layout_s if reorder else 0):.1f}", f"{dt:.1f}" if ok else "round trip FAILED"])
    return md_table(["layout", "compressor", "bytes (payload + perms)", "vs today", "vs today %", "compress s",
                     "decompress s"], rows, "llrrrrr")


@dataclass(frozen=True)
class CheckpointInputs:
    state: dict[str, Tensor]  # the float checkpoint
    hessians: dict[str, Tensor]  # collected as the trainer does (mean XᵀX over calibration batches)
    score: Scorer  # the trainer's model and plain eval
    float_bpb: float
    quant_kwargs: dict  # the run's bits and SDClip sigmas
    passthrough_numel: int
    description: str


def checkpoint_inputs(checkpoint: Path, summary: Path) -> CheckpointInputs:
    """Everything the checkpoint mode needs, from a trained checkpoint and its run_summary.json, through the
    trainer's own phases: `Run.from_checkpoint`, `Run.calibrate` (the run's calibration batches, no time limit) and
    the plain eval of `Run.plain_eval` on the model with each state dict loaded."""
    import math

    import train_gpt as tg

    cfg = tg.Config.from_summary(summary)
    run_summary = json.loads(summary.read_text())
    rt = tg.setup_runtime(cfg)
    run = tg.Run.from_checkpoint(cfg, rt, checkpoint)
    state = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}

    def score(sd: dict[str, Tensor]) -> float:
        run.model.load_state_dict({k: v.to(rt.device) for k, v in sd.items()}, strict=True)
        run.model.looping = cfg.num_loops > 0  # the final model always runs looped
        return run.plain_eval(run.model.eval().forward_logits)[1]

    t = time.perf_counter()
    hessians = {k: v.cpu() for k, v in run.calibrate(seconds=math.inf).items()}
    progress(f"collected {len(hessians)} Hessians in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    float_bpb = score(state)
    progress(f"float val_bpb {float_bpb:.5f} ({time.perf_counter() - t:.1f} s)")
    qkw = dict(matrix_bits=cfg.matrix_bits, embed_bits=cfg.embed_bits, embed_clip_sigmas=cfg.embed_clip_sigmas,
               roles=bench_roles(state, cfg.passthrough_numel), attn_clip_sigmas=cfg.attn_clip_sigmas,
               mlp_clip_sigmas=cfg.mlp_clip_sigmas)
    trained = run_summary.get("evals", {}).get("pre-quantization post-ema", {}).get("val_bpb")
    L = cfg.eval_seq_len
    desc = (f"Checkpoint `{checkpoint}`: {run_summary.get('steps')} steps of {cfg.num_layers}L x {cfg.model_dim}d "
            f"(vocab {cfg.vocab_size}), {run.data.val_tokens.numel() - 1:,} val tokens, plain eval at seq {L}; float "
            f"val_bpb {float_bpb:.5f} (the run logged {trained if trained is None else f'{trained:.5f}'}); the run's "
            f"own artifact: {run_summary.get('bytes_model', 0):,} bytes ({cfg.compressor}). SDClip k = "
            f"{cfg.attn_clip_sigmas:g} / {cfg.mlp_clip_sigmas:g} / {cfg.embed_clip_sigmas:g} (attention / MLP / embedding); "
            f"Hessians from "
            f"{cfg.gptq_calibration_batches} calibration batches.")
    return CheckpointInputs(state, hessians, score, float_bpb, qkw, cfg.passthrough_numel, desc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path,
                        help="float state dict written by the trainer (final_model.pt); without it: synthetic weights")
    parser.add_argument("--config", type=Path,
                        help="run_summary.json of the checkpoint's run (default: the one beside the checkpoint)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="synthetic mode: multiply every dimension by this (1.0 = the record's 35.9M parameters)")
    parser.add_argument("--layers", type=int, default=11, help="synthetic mode: number of transformer layers")
    parser.add_argument("--seed", type=int, default=0, help="synthetic mode: seed of the weights and activations")
    parser.add_argument("--codecs", default=",".join(ARTIFACT_CODECS),
                        help="comma-separated codecs to measure, the first one used for the headline bytes")
    parser.add_argument("--packing-sample", type=int, default=4_000_000,
                        help="int6 symbols used for the packing comparison (brotli-11 takes ~3 s per million)")
    parser.add_argument("--lqer-rank", type=int, default=4, help="LQER arm: rank of the correction (record N: 4)")
    parser.add_argument("--lqer-top-k", type=int, default=3, help="LQER arm: corrected tensors (record N: 3)")
    parser.add_argument("--lqer-group", type=int, default=64, help="LQER arm: INT4 group of B (record N: 64)")
    parser.add_argument("--codec-study", action="store_true",
                        help="instead of the benchmark: bytes and seconds of every layout x compressor on the GPTQ codes")
    parser.add_argument("--study-only", default="",
                        help="codec study: comma-separated substrings; only compressors whose name contains one")
    parser.add_argument("--study-slow", default="zpaq,lrzip,lzma,ppmd7 order 4",
                        help="codec study: compressors (substrings) measured on the row-/column-major layouts only")
    parser.add_argument("--study-layouts", default="",
                        help=f"codec study: comma-separated layouts to measure (default all: {', '.join(STUDY_LAYOUTS)})")
    parser.add_argument("--study-base", type=int,
                        help="codec study: today's bytes (brotli-11, row-major) when --study-layouts leaves them out")
    parser.add_argument("--artifact", type=Path,
                        help="codec study: the GPTQ codes of this PGQ artifact (e.g. a real run's final_model.int6.ptz) "
                             "instead of quantizing a checkpoint or synthetic model")
    parser.add_argument("--save-artifact", type=Path,
                        help="codec study: also write the GPTQ codes it quantized as an artifact, for a later --artifact")
    args = parser.parse_args(argv)
    codecs = tuple(c for c in args.codecs.split(",") if c)
    bad = [c for c in codecs if c not in ARTIFACT_CODECS]
    if bad or not codecs or args.scale <= 0 or args.layers < 1:
        parser.error(f"need codecs from {ARTIFACT_CODECS} (got {bad or codecs}), --scale > 0 and --layers >= 1")
    if args.lqer_rank < 1 or args.lqer_top_k < 1 or args.lqer_group < 1:
        parser.error("--lqer-rank, --lqer-top-k and --lqer-group must be >= 1")
    lqer = {"lqer_rank": args.lqer_rank, "lqer_top_k": args.lqer_top_k, "lqer_group": args.lqer_group}
    split = lambda v: tuple(x for x in v.split(",") if x)
    if args.codec_study and args.artifact is not None:
        try:
            qts = load_artifact(args.artifact)
        except ArtifactError as e:
            print(f"bench/quant.py: {args.artifact}: {e}", file=sys.stderr)
            return 2
        print(f"Artifact `{args.artifact}`: {sum(qt.codes.numel() for qt in qts if qt.codes is not None):,} codes in "
              f"{sum(qt.kind != 'passthrough' for qt in qts)} quantized tensors.\n")
        print(codec_study(qts, split(args.study_only), split(args.study_slow), split(args.study_layouts),
                          args.study_base))
        return 0
    if args.checkpoint is not None:
        summary = (args.config or args.checkpoint.parent / "run_summary.json").resolve()
        args.checkpoint = args.checkpoint.resolve()
        os.chdir(Path(__file__).resolve().parent.parent)  # the run's data paths are relative to the repo root
        for path, what in ((args.checkpoint, "checkpoint"), (summary, "run summary (--config)")):
            if not path.is_file():
                print(f"bench/quant.py: {what} {path} not found", file=sys.stderr)
                return 2
        try:
            ck = checkpoint_inputs(args.checkpoint, summary)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            print(f"bench/quant.py: {e}", file=sys.stderr)
            return 2
        state, hessians, pnumel, score, float_bpb, qkw = (ck.state, ck.hessians, ck.passthrough_numel, ck.score,
                                                           ck.float_bpb, ck.quant_kwargs)
        print(ck.description + "\n")
    else:
        t = time.perf_counter()
        state, hessians = synthetic_model(args.scale, args.seed, args.layers)
        progress(f"synthetic model built in {time.perf_counter() - t:.1f} s")
        print(f"Synthetic model (scale {args.scale}, {args.layers} layers, seed {args.seed}): "
              f"{sum(w.numel() for w in state.values()):,} parameters, Student-t rows with log-normal row and column "
              f"scales, correlated calibration activations; no val_bpb in this mode.\n")
        # the passthrough threshold (65,536 elements) shrinks with the matrices so the same tensors stay quantized
        pnumel, score, float_bpb, qkw = round(65536 * args.scale**2), None, None, {}
    if args.codec_study:
        t = time.perf_counter()
        qts = quantize_state_dict(state, hessians, passthrough_numel=pnumel, **qkw)
        progress(f"codec study: GPTQ in {time.perf_counter() - t:.1f} s")
        if args.save_artifact is not None:
            save_artifact(args.save_artifact, encode_artifact(qts))
        print(codec_study(qts, split(args.study_only), split(args.study_slow), split(args.study_layouts),
                          args.study_base))
        return 0
    print(run_benchmark(state, hessians, codecs, args.packing_sample, pnumel, score, float_bpb, qkw))
    print("\n" + lqer_benchmark(state, hessians, codecs[0], pnumel, score, float_bpb, qkw, lqer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
