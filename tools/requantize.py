"""Re-quantize a saved float checkpoint with other settings and report bytes and quantized val_bpb.

Zero-cost sweeps: upstream found clip sigmas and bit widths worth re-sweeping for every new model (PR #1394), and
that needs no retraining. Hessians are collected once from training batches, then every combination of the
given settings is quantized, packed and scored with the trainer's own model, loader and eval (import train_gpt).

    python tools/requantize.py --checkpoint out/final_model.pt --matrix-clip-sigmas 11.5 12.85 14 --embed-bits 7 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import train_gpt as tg
from quant import ArtifactError, encode_artifact, quantize_state_dict, save_artifact


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="float state dict written by the trainer (final_model.pt)")
    p.add_argument("--config", type=Path, help="run_summary.json of the run (default: the one beside the checkpoint)")
    p.add_argument("--data-dir", type=Path, help="dataset dir with fineweb_{train,val}_*.bin (default: the run's)")
    p.add_argument("--tokenizer", type=Path, help="SentencePiece model (default: the run's)")
    p.add_argument("--matrix-bits", type=int, nargs="+", help="bits for block matrices (run default: MATRIX_BITS)")
    p.add_argument("--matrix-clip-sigmas", type=float, nargs="+", help="SDClip k for block matrices")
    p.add_argument("--embed-bits", type=int, nargs="+", help="bits for the tied embedding")
    p.add_argument("--embed-clip-sigmas", type=float, nargs="+", help="SDClip k for the tied embedding")
    p.add_argument("--compressor", nargs="+", choices=["brotli", "zstd", "lzma"], help="artifact codec")
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq", help="GPTQ (default) or round-to-nearest")
    p.add_argument("--calibration-batches", type=int, help="Hessian batches (default: GPTQ_CALIBRATION_BATCHES)")
    p.add_argument("--out", type=Path, help="write the artifact of the (single) setting here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = args.config or args.checkpoint.parent / "run_summary.json"
    for path, what in ((args.checkpoint, "checkpoint"), (summary, "run summary (--config)")):
        if not path.is_file():
            print(f"requantize: {what} {path} not found", file=sys.stderr)
            return 2
    overrides = {k: str(v) for k, v in (("data_path", args.data_dir), ("tokenizer_path", args.tokenizer)) if v}
    if args.calibration_batches:
        overrides["gptq_calibration_batches"] = args.calibration_batches
    try:
        cfg = tg.Config.from_summary(summary, **overrides)
        sp = tg.load_tokenizer(cfg.tokenizer_file, cfg.vocab_size)
        luts = tg.build_byte_luts(sp, cfg.vocab_size)
        val = tg.load_val_tokens(str(cfg.dataset_dir / "fineweb_val_*.bin"), cfg.eval_seq_len, cfg.vocab_size)
        train_files = tg.shard_files(str(cfg.dataset_dir / "fineweb_train_*.bin"))
    except (OSError, ValueError, KeyError) as e:
        print(f"requantize: {e}", file=sys.stderr)
        return 2
    grid = list(itertools.product(args.matrix_bits or [cfg.matrix_bits], args.matrix_clip_sigmas or [cfg.matrix_clip_sigmas],
                                  args.embed_bits or [cfg.embed_bits], args.embed_clip_sigmas or [cfg.embed_clip_sigmas],
                                  args.compressor or [cfg.compressor]))
    if args.out and len(grid) > 1:
        print("requantize: --out takes a single setting (the sweep has several)", file=sys.stderr)
        return 2

    rt = tg.setup_runtime()
    model = tg.GPT(cfg).to(rt.device)
    model.load_state_dict(torch.load(args.checkpoint, map_location=rt.device, weights_only=True), strict=True)
    model.looping = cfg.num_loops > 0
    accum = tg.grad_accum_steps(cfg, 1)  # batching exactly as a 1-rank trainer run, so scores reproduce
    L, windows = cfg.eval_seq_len, max(1, cfg.val_batch_tokens // (accum * cfg.eval_seq_len))
    micro = cfg.train_batch_tokens // (accum * cfg.train_seq_len)
    t = time.perf_counter()
    loader = tg.ShuffledSequenceLoader(train_files, cfg.train_seq_len, cfg.vocab_size, cfg.seed)
    batches = (loader.next_batch(micro)[0].to(rt.device) for _ in range(cfg.gptq_calibration_batches))
    hessians, count = tg.collect_hessians(model, batches, cfg.passthrough_numel, rt.amp)
    hessians = {k: (v / count).cpu() for k, v in hessians.items()}
    print(f"collected {len(hessians)} Hessians from {count} batches in {time.perf_counter() - t:.1f}s")
    float_loss, float_bpb = tg.evaluate(model.forward_logits, val, L, L, luts, windows, rt.device, rt.amp)
    code_bytes = json.loads(summary.read_text()).get("bytes_code", 0)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    header = f"{'bits':>4} {'clip':>6} {'emb':>3} {'eclip':>6} {'codec':>6} {'model_bytes':>12} {'total':>12} {'fits':>4} "
    print(f"float (unquantized) val_bpb {float_bpb:.8f}  code bytes {code_bytes}  limit {tg.ARTIFACT_LIMIT_BYTES}")
    print(header + f"{'val_bpb':>11} {'gap':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for mbits, mclip, ebits, eclip, codec in grid:
            qt = quantize_state_dict(state, hessians, matrix_bits=mbits, matrix_clip_sigmas=mclip, embed_bits=ebits,
                                     embed_clip_sigmas=eclip, passthrough_numel=cfg.passthrough_numel, method=args.method)
            path = args.out or Path(tmp) / "artifact.ptz"
            save_artifact(path, encode_artifact(qt, codec=codec))
            try:
                qmodel = tg.load_quantized_model(path, cfg, rt.device)
            except ArtifactError as e:
                print(f"requantize: {e}", file=sys.stderr)
                return 1
            _, bpb = tg.evaluate(qmodel.forward_logits, val, L, L, luts, windows, rt.device, rt.amp)
            size = path.stat().st_size
            total = size + code_bytes
            fits = "yes" if total <= tg.ARTIFACT_LIMIT_BYTES else "NO"
            print(f"{mbits:>4} {mclip:>6g} {ebits:>3} {eclip:>6g} {codec:>6} {size:>12,} {total:>12,} {fits:>4} "
                  f"{bpb:>11.8f} {bpb - float_bpb:>+9.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
