"""Legality checker: run the trainer's real eval path on a val prefix and test issue #1017's four conditions.

    python tools/check_legality.py --artifact /tmp/pg/run2/final_model.int6.ptz \
        --data-dir data/datasets/builtin_sp1024 --tokenizer data/tokenizers/builtin_1024_bpe.model

Both modes use the functions train_gpt.py scores with, on a model from train_gpt.load_quantized_model: sliding
(window_starts + score_windows, as evaluate does) and record N's phased score-first TTT (evals.phased_ttt's
eval_phased_ttt, on a freshly loaded model for every run because its global phases change the weights). CPU, one
process. Checks (docs/rules.md; upstream issue #1017):

  C1 causality / C3 score-before-update: rerun with the tokens after a cut replaced by random ids; every loss
     before the cut must be bit-identical, and the run must change some later loss (else the check saw nothing).
     Sliding: the cut is a stream position k, every token after it is replaced, and the losses of targets j < k
     (target j predicts tokens[j+1] from tokens[..j]) are compared. Windows end on multiples of EVAL_STRIDE, so a
     leak inside a window (a lost causal mask) only shows at cuts off that grid; the default cuts include such cuts.
     TTT: the phased TTT scores documents in batches sorted by length, so "before" is its processing order (batch,
     chunk, document slot, position): the cut is a position k in it, the target tokens of the targets from k on are
     replaced (BOS tokens kept, so the documents and the schedule stay), and the losses of the targets before k are
     compared. This proves no score used an update, an adapter or a global phase that saw a later target.
  C2 normalized: for a few scored windows the logits are recomputed from the window's tokens alone; the vocab
     dimension must be VOCAB_SIZE, the softmax must sum to 1 and exp(-loss) must equal the target's softmax
     probability. (For TTT: the first step's windows with the artifact's weights, which scored them: nothing is
     trained before it and fresh adapters add exactly 0.) A loss that used the target token itself fails here.
  C4 single pass: every target scored exactly once.

Exit 0 PASS, 1 FAIL, 2 bad input. Upstream cases these checks would have caught: issue #1017 and the closed
pre-eval-TTT, rescoring and n-gram-cache PRs (upstream #677); the perturbation idea is PR #1240's SLOT proof.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from data.shards import ShardError, load_data
from evals.phased_ttt import find_docs, make_plan
from tools.legality import (
    CheckError,
    PhasedTTTEval,
    Row,
    SlidingEval,
    check_eval,
    default_cuts,
    format_table,
    load_config,
    load_model_fn,
    ttt_cuts,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, required=True, help="the quantized model (final_model.int6.ptz)")
    ap.add_argument("--data-dir", type=Path, help="dataset dir with fineweb_val_*.bin (overrides DATA_PATH)")
    ap.add_argument("--tokenizer", type=Path, help="SentencePiece .model (overrides TOKENIZER_PATH)")
    ap.add_argument("--tokens", type=int, help="targets to evaluate from the start of val (default: the first "
                    "2 x TTT_LANES x TTT_BATCH_SIZE documents, two rounds of the phased TTT: adapters carry over between "
                    "batches and a global phase runs between the rounds; at most all of val)")
    ap.add_argument("--mode", choices=("sliding", "ttt", "both"), default="both", help="which eval path to check")
    ap.add_argument("--config", type=Path, help="run_summary.json whose \"config\" is the run's Config (default: the "
                    "one beside the artifact, else env vars as train_gpt.py reads them)")
    ap.add_argument("--cuts", type=int, nargs="+", help="cut positions k for every mode (sliding: a stream position, "
                    "the tokens after it are replaced; ttt: a position in the processing order); default, up to 4 per "
                    "mode: sliding inside and at the end of the first window, a window end (= stride boundary), "
                    "mid-stream; ttt inside the first step, the next chunk, the second batch, after the first phase")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random replacement tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for tiny models on "
                    "busy shared cores; bit-identity is compared within one run, so any value is valid)")
    ap.add_argument("--batch-windows", type=int, default=32, help="windows per forward (upstream's per-rank 32)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cfg_source = ""
    try:
        if not args.artifact.is_file():
            raise CheckError(f"{args.artifact}: no such artifact")
        cfg, cfg_source = load_config(args.config, args.artifact)
        overrides = {k: str(v) for k, v in (("data_path", args.data_dir), ("tokenizer_path", args.tokenizer)) if v}
        cfg = dataclasses.replace(cfg, **overrides)
        if not cfg.dataset_dir.is_dir():
            raise CheckError(f"{cfg.dataset_dir}: no such dataset dir")
        try:
            data = load_data(cfg.dataset_dir, cfg.tokenizer_file, cfg.vocab_size, cfg.eval_seq_len)
        except RuntimeError:  # sentencepiece's parse error
            raise CheckError(f"{cfg.tokenizer_file}: not a SentencePiece model") from None
        luts, val = data.luts, data.val_tokens
        L, S = cfg.eval_seq_len, cfg.eval_stride
        if args.tokens is not None and args.tokens < L:
            raise CheckError(f"--tokens {args.tokens}: need at least one window of EVAL_SEQ_LEN={L}")
        docs = find_docs(val)[: 2 * cfg.ttt_lanes * cfg.ttt_batch_size]
        n = min(args.tokens or max(L, sum(docs[-1]) - 1), val.numel() - 1)
        tokens = val[: n + 1]
        modes = ["sliding", "ttt"] if args.mode == "both" else [args.mode]
        auto = {"sliding": lambda: default_cuts(n, L, S), "ttt": lambda: ttt_cuts(tokens, cfg)}
        cuts = {m: [("", k) for k in args.cuts] if args.cuts else auto[m]() for m in modes}
        if bad := [k for k in args.cuts or [] if not 1 <= k <= n - 1]:
            raise CheckError(f"cuts {bad} outside 1..{n - 1} (the evaluated targets)")
        if args.batch_windows < 1 or args.threads < 1:
            raise CheckError("--batch-windows and --threads must be >= 1")
        load = load_model_fn(args.artifact, cfg)
    except (CheckError, ShardError, FileNotFoundError, ValueError) as e:
        hint = "; the config came from env vars: pass --config run_summary.json" if cfg_source.startswith("env") else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    plan = make_plan(tokens, cfg.ttt_batch_size, cfg.phased_ttt_prefix_docs, cfg.phased_ttt_num_phases)
    print(f"artifact {args.artifact}; config from {cfg_source}")
    print(f"val prefix: {n} targets of {val.numel() - 1}; EVAL_SEQ_LEN={L} EVAL_STRIDE={S}; phased TTT: "
          f"{len(plan.docs)} documents in {len(plan.queue)} batches of <= {cfg.ttt_batch_size}, {cfg.ttt_lanes} lanes, "
          f"phase boundaries {plan.boundaries}, TTT_CHUNK_SIZE={cfg.ttt_chunk_size} "
          f"TTT_EVAL_SEQ_LEN={cfg.ttt_eval_seq_len} TTT_LORA_LR={cfg.ttt_lora_lr:g} GLOBAL_TTT_LR={cfg.global_ttt_lr:g}")
    for m in modes:
        print(f"{m} cuts: {', '.join(f'{k} ({label})' if label else str(k) for label, k in cuts[m])}")
    if len(plan.queue) <= cfg.ttt_lanes and args.mode != "sliding":
        print("warning: one round of TTT batches: no global phase precedes a score; raise --tokens")

    def progress(msg: str) -> None:
        print(f"  ... {msg} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)

    rows: list[Row] = []
    torch.set_num_threads(args.threads)
    if "sliding" in modes:
        sliding = SlidingEval(load(), cfg, luts, args.batch_windows)
        rows += check_eval(sliding, tokens, cuts["sliding"], cfg.vocab_size, "sliding", args.seed, sliding.probe, progress)
        if sliding.results:
            vl, vb = sliding.results[0]
            print(f"sliding: val_loss {vl:.6f} val_bpb {vb:.6f} on the prefix")
    if "ttt" in modes:
        ttt = PhasedTTTEval(load, cfg, luts)
        rows += check_eval(ttt, tokens, cuts["ttt"], cfg.vocab_size, "ttt", args.seed, ttt.probe, progress,
                           ttt.order(tokens))
        if ttt.results:
            vl, vb = ttt.results[0]
            print(f"ttt: val_loss {vl:.6f} val_bpb {vb:.6f} on the prefix")
    print()
    print(format_table(rows))
    failed = sum(not r.ok for r in rows)
    wall = time.perf_counter() - t0
    if failed:
        print(f"FAIL: {failed} of {len(rows)} checks failed ({wall:.1f}s)")
        return 1
    print(f"PASS: all {len(rows)} checks passed ({wall:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
