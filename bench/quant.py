"""Quantization benchmark: GPTQ+SDClip int6 vs round-to-nearest int6 vs the upstream int8+zlib baseline.

Run from the repo root: `python bench/quant.py --checkpoint runs/bench/ref/final_model.pt` (a trained checkpoint with
its run_summary.json beside it) or `python bench/quant.py [--scale 0.25]` (synthetic weights). Prints, as markdown:
compressed bytes per method and quantized val_bpb with its gap to the float model (checkpoint mode: the trainer's
model and plain `train_gpt.evaluate`); every codec's bytes against the order-0 entropy bound; reconstruction errors
(relative Frobenius error of W and of the layer output XWᵀ, the latter from the Hessian: ‖X(W−Ŵ)ᵀ‖² = tr(E H Eᵀ));
a packing comparison (int8 containers vs 6-bit packing) and the container overhead.
The synthetic mode builds the record's matrix set with heavy-tailed rows and correlated calibration activations; its
full scale takes ~12 min on 2 busy CPU cores (GPTQ ~75 s, then ~1 min per codec per artifact). The checkpoint mode
collects Hessians like the trainer (GPTQ_CALIBRATION_BATCHES batches of the run's loader and seed).
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
    QTensor,
    byte_shuffle,
    compress_bytes,
    decode_artifact,
    dequantize,
    encode_artifact,
    quantize_state_dict,
)
from quant.__main__ import order0_bits

Scorer = Callable[[dict[str, Tensor]], float]  # a (dequantized) state dict -> val_bpb
CODEC_LABEL = {"zlib": "zlib-9", "brotli": "brotli-11", "zstd": "zstd-22", "lzma": "lzma-9e"}


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


def baseline_int8(state: dict[str, Tensor], passthrough_numel: int) -> tuple[dict[str, Tensor], bytes, float]:
    """Root baseline export (STACK.md §G): per-row int8, clip at the 99.99984th percentile of |w|, scale = clip/127
    (≥ 1/127), fp16 scales; smaller tensors fp16 (upstream keeps a few control tensors fp32: a few KB at most).
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
    """Everything the checkpoint mode needs, from a trained checkpoint and its run_summary.json."""
    import train_gpt as tg

    cfg = tg.Config.from_summary(summary)
    run = json.loads(summary.read_text())
    sp = tg.load_tokenizer(cfg.tokenizer_file, cfg.vocab_size)
    luts = tg.build_byte_luts(sp, cfg.vocab_size)
    val = tg.load_val_tokens(str(cfg.dataset_dir / tg.VAL_GLOB), cfg.eval_seq_len, cfg.vocab_size)
    train_files = tg.shard_files(str(cfg.dataset_dir / "fineweb_train_*.bin"))
    rt = tg.setup_runtime()
    L, accum = cfg.eval_seq_len, tg.grad_accum_steps(cfg, 1)
    windows = max(1, cfg.val_batch_tokens // (accum * L))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)

    def score(sd: dict[str, Tensor]) -> float:
        model = tg.GPT(cfg).to(rt.device)
        model.load_state_dict({k: v.to(rt.device) for k, v in sd.items()}, strict=True)
        model.looping = cfg.num_loops > 0  # the final model always runs looped
        return tg.evaluate(model.eval().forward_logits, val, L, L, luts, windows, rt.device, rt.amp)[1]

    model = tg.GPT(cfg).to(rt.device)
    model.load_state_dict(state, strict=True)
    model.looping = cfg.num_loops > 0
    t = time.perf_counter()
    loader = tg.ShuffledSequenceLoader(train_files, cfg.train_seq_len, cfg.vocab_size, cfg.seed)
    micro = cfg.train_batch_tokens // (accum * cfg.train_seq_len)
    batches = (loader.next_batch(micro)[0].to(rt.device) for _ in range(cfg.gptq_calibration_batches))
    hessians, count = tg.collect_hessians(model, batches, cfg.passthrough_numel, rt.amp)
    hessians = {k: (v / count).cpu() for k, v in hessians.items()}
    progress(f"collected {len(hessians)} Hessians from {count} batches in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    float_bpb = score(state)
    progress(f"float val_bpb {float_bpb:.5f} ({time.perf_counter() - t:.1f} s)")
    qkw = dict(matrix_bits=cfg.matrix_bits, matrix_clip_sigmas=cfg.matrix_clip_sigmas, embed_bits=cfg.embed_bits,
               embed_clip_sigmas=cfg.embed_clip_sigmas)
    trained = run.get("evals", {}).get("pre-quantization post-ema", {}).get("val_bpb")
    desc = (f"Checkpoint `{checkpoint}`: {run.get('steps')} steps of {cfg.num_layers}L x {cfg.model_dim}d "
            f"(vocab {cfg.vocab_size}), {val.numel() - 1:,} val tokens, plain eval at seq {L}; float val_bpb "
            f"{float_bpb:.5f} (the run logged {trained if trained is None else f'{trained:.5f}'}); the run's own "
            f"artifact: {run.get('bytes_model', 0):,} bytes ({cfg.compressor}). SDClip k = {cfg.matrix_clip_sigmas:g} "
            f"(matrices) / {cfg.embed_clip_sigmas:g} (embedding); Hessians from {count} calibration batches.")
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
    args = parser.parse_args(argv)
    codecs = tuple(c for c in args.codecs.split(",") if c)
    bad = [c for c in codecs if c not in ARTIFACT_CODECS]
    if bad or not codecs or args.scale <= 0 or args.layers < 1:
        parser.error(f"need codecs from {ARTIFACT_CODECS} (got {bad or codecs}), --scale > 0 and --layers >= 1")
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
        print(ck.description + "\n")
        print(run_benchmark(ck.state, ck.hessians, codecs, args.packing_sample, ck.passthrough_numel, ck.score,
                            ck.float_bpb, ck.quant_kwargs))
        return 0
    t = time.perf_counter()
    state, hessians = synthetic_model(args.scale, args.seed, args.layers)
    progress(f"synthetic model built in {time.perf_counter() - t:.1f} s")
    print(f"Synthetic model (scale {args.scale}, {args.layers} layers, seed {args.seed}): Student-t rows, correlated "
          f"calibration activations; no val_bpb in this mode.\n")
    # the passthrough threshold (65,536 elements) shrinks with the matrices so the same tensors stay quantized
    print(run_benchmark(state, hessians, codecs, args.packing_sample, passthrough_numel=round(65536 * args.scale**2)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
