"""Re-quantize a saved float checkpoint with other settings and report bytes and quantized val_bpb.

Zero-cost sweeps: upstream found clip sigmas and bit widths worth re-sweeping for every new model (PR #1394), and
that needs no retraining. Hessians are collected once from training batches, then every combination of the
given settings is quantized, packed and scored with the trainer's own model, loader and eval (import train_gpt).

    python tools/requantize.py --checkpoint out/final_model.pt --matrix-clip-sigmas 11.5 12.85 14 --embed-bits 7 8

A run of an experiment entry script (experiments/<name>.py, named by the run's log) is re-quantized with that entry's
Config, model and quantization roles installed (tools/experiment_entry.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import train_gpt as tg
from quant import ARTIFACT_CODECS, ArtifactError
from tools import experiment_entry


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="float state dict written by the trainer (final_model.pt)")
    p.add_argument("--config", type=Path, help="run_summary.json of the run (default: the one beside the checkpoint)")
    p.add_argument("--data-dir", type=Path, help="dataset dir with fineweb_{train,val}_*.bin (default: the run's)")
    p.add_argument("--tokenizer", type=Path, help="SentencePiece model (default: the run's)")
    p.add_argument("--matrix-bits", type=int, nargs="+", help="bits for block matrices (run default: MATRIX_BITS)")
    p.add_argument("--matrix-clip-sigmas", type=float, nargs="+",
                   help="SDClip k for every block matrix (sets ATTN_CLIP_SIGMAS and MLP_CLIP_SIGMAS together)")
    p.add_argument("--embed-bits", type=int, nargs="+", help="bits for the tied embedding")
    p.add_argument("--embed-clip-sigmas", type=float, nargs="+", help="SDClip k for the tied embedding")
    p.add_argument("--compressor", nargs="+", choices=ARTIFACT_CODECS, help="artifact codec")
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
    try:
        found = experiment_entry.run_entry(summary)
        if found and (note := experiment_entry.drift(*found)):
            print(note)
        with experiment_entry.entry_installed(found[0] if found else None):  # tg.Config, tg.GPT ... are the entry's
            return requantize(args, summary)
    except experiment_entry.EntryError as e:
        print(f"requantize: {e}", file=sys.stderr)
        return 2


def requantize(args: argparse.Namespace, summary: Path) -> int:
    overrides = {k: str(v) for k, v in (("data_path", args.data_dir), ("tokenizer_path", args.tokenizer)) if v}
    if args.calibration_batches:
        overrides["gptq_calibration_batches"] = args.calibration_batches
    try:
        cfg = tg.Config.from_summary(summary, **overrides)
        rt = tg.setup_runtime(cfg)
        run = tg.Run.from_checkpoint(cfg, rt, args.checkpoint)  # the trainer's own data, model and phases
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(f"requantize: {e}", file=sys.stderr)
        return 2
    grid = list(itertools.product(args.matrix_bits or [cfg.matrix_bits], args.matrix_clip_sigmas or [cfg.attn_clip_sigmas],
                                  args.embed_bits or [cfg.embed_bits], args.embed_clip_sigmas or [cfg.embed_clip_sigmas],
                                  args.compressor or [cfg.compressor]))
    if args.out and len(grid) > 1:
        print("requantize: --out takes a single setting (the sweep has several)", file=sys.stderr)
        return 2

    t = time.perf_counter()
    hessians = run.calibrate(seconds=math.inf)
    print(f"collected {len(hessians)} Hessians from {cfg.gptq_calibration_batches} batches in "
          f"{time.perf_counter() - t:.1f}s")
    _, float_bpb = run.plain_eval(run.model.forward_logits)
    code_bytes = json.loads(summary.read_text()).get("bytes_code", 0)

    header = f"{'bits':>4} {'clip':>6} {'emb':>3} {'eclip':>6} {'codec':>6} {'model_bytes':>12} {'total':>12} {'fits':>4} "
    print(f"float (unquantized) val_bpb {float_bpb:.8f}  code bytes {code_bytes}  limit {tg.ARTIFACT_LIMIT_BYTES}")
    print(header + f"{'val_bpb':>11} {'gap':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for mbits, mclip, ebits, eclip, codec in grid:
            same = args.matrix_clip_sigmas is None  # the run's own per-role sigmas unless a sweep sets both
            variant = dataclasses.replace(cfg, matrix_bits=mbits, attn_clip_sigmas=cfg.attn_clip_sigmas if same else mclip,
                                          mlp_clip_sigmas=cfg.mlp_clip_sigmas if same else mclip, embed_bits=ebits,
                                          embed_clip_sigmas=eclip, compressor=codec)
            path = args.out or Path(tmp) / "artifact.ptz"
            size = run.serialize(hessians, path, variant, method=args.method)
            try:
                qmodel = tg.load_quantized_model(path, cfg, rt.device, rt.precision, rt.fa3)
            except ArtifactError as e:
                print(f"requantize: {e}", file=sys.stderr)
                return 1
            _, bpb = run.plain_eval(qmodel.forward_logits)
            total = size + code_bytes
            fits = "yes" if total <= tg.ARTIFACT_LIMIT_BYTES else "NO"
            print(f"{mbits:>4} {mclip:>6g} {ebits:>3} {eclip:>6g} {codec:>6} {size:>12,} {total:>12,} {fits:>4} "
                  f"{bpb:>11.8f} {bpb - float_bpb:>+9.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
