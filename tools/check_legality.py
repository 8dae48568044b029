"""Legality checker: run the trainer's real eval path on a val prefix and test issue #1017's four conditions.

    python tools/check_legality.py --artifact /tmp/pg/run2/final_model.int6.ptz \
        --data-dir data/datasets/builtin_sp1024 --tokenizer data/tokenizers/builtin_1024_bpe.model

Both modes use the functions train_gpt.py scores with, on a model from train_gpt.load_quantized_model: sliding
(window_starts + score_windows, as evaluate does) and score-first TTT (eval_ttt, on a freshly loaded model for every
run because TTT changes the weights). CPU, one process. Checks (ECOSYSTEM.md §2.5, STACK.md §D.4):

  C1 causality / C3 score-before-update: rerun with every token after a cut k replaced by random ids; the loss of
     every target j < k (target j predicts tokens[j+1] from tokens[..j], so it reads only tokens <= k) must be
     bit-identical. With TTT this also proves no earlier score used an update that saw a later token. The run must
     also change some later loss, or the check saw nothing. Windows end on multiples of EVAL_STRIDE, so a leak
     inside a window (a lost causal mask) only shows at cuts off that grid; the default cuts include such cuts.
  C2 normalized: for a few scored windows the logits are recomputed from the window's tokens alone; the vocab
     dimension must be VOCAB_SIZE, the softmax must sum to 1 and exp(-loss) must equal the target's softmax
     probability. (For TTT: chunk 0 with the artifact's weights, the last chunk with the weights after the run,
     since the last chunk is never trained on.) A loss that used the target token itself fails here.
  C4 single pass: every target scored exactly once.

Exit 0 PASS, 1 FAIL, 2 bad input. Upstream cases these checks would have caught: issue #1017 and the closed
pre-eval-TTT, rescoring and n-gram-cache PRs (ECOSYSTEM.md §2.6); the perturbation idea is PR #1240's SLOT proof.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import train_gpt

EvalFn = Callable[[Tensor], tuple[Tensor, Tensor]]  # tokens -> (float64 loss per target, times each was scored)
Scored = tuple[Tensor, Tensor]  # (target indices [K], the logits they were scored from [K, vocab])
ProbeFn = Callable[[Tensor], list[Scored]]
CPU = torch.device("cpu")
PROB_TOL = 1e-5  # |exp(-loss) - p(target)| and |sum p - 1|: float32 logits recomputed in another batch shape


class CheckError(ValueError):
    """Missing or inconsistent input; printed as one line, exit 2."""


@dataclass(frozen=True)
class Row:
    check: str
    mode: str
    cut: str
    ok: bool
    details: str


# -----------------------------------------------------------------------------
# core: works on any eval callable, so tests can feed it illegal variants
# -----------------------------------------------------------------------------


def perturb_after(tokens: Tensor, k: int, vocab_size: int, seed: int) -> Tensor:
    """A copy of tokens with every position > k replaced by uniform random ids in [0, vocab_size)."""
    out = tokens.clone()
    gen = torch.Generator().manual_seed(seed)
    out[k + 1 :] = torch.randint(0, vocab_size, (tokens.numel() - k - 1,), generator=gen, dtype=tokens.dtype)
    return out


def same_bits(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise bit equality of float64 tensors (NaN == NaN, 0.0 != -0.0)."""
    return a.double().view(torch.int64) == b.double().view(torch.int64)


def check_single_pass(hits: Tensor, num_targets: int, mode: str) -> Row:
    """C4: hits has one entry per target and every entry is 1."""
    if hits.numel() != num_targets:
        return Row("C4 single pass", mode, "-", False, f"{hits.numel()} hit counters for {num_targets} targets")
    bad = torch.nonzero(hits != 1).flatten()
    if len(bad):
        j = int(bad[0])
        return Row("C4 single pass", mode, "-", False, f"{len(bad)} of {num_targets} targets not scored exactly once "
                   f"(first: target {j} scored {int(hits[j])}x; counts seen {sorted(set(hits.tolist()))})")
    return Row("C4 single pass", mode, "-", True, f"all {num_targets} targets scored exactly once")


def check_causal(eval_fn: EvalFn, tokens: Tensor, base_nll: Tensor, k: int, label: str, vocab_size: int,
                 seed: int, mode: str, name: str) -> Row:
    """C1 (and C3 for adaptive evals): losses of targets j < k are bit-identical after perturbing tokens > k."""
    cut = f"{k} ({label})" if label else str(k)
    nll, _ = eval_fn(perturb_after(tokens, k, vocab_size, seed + k))
    same = same_bits(nll, base_nll)
    before, after = same[:k], same[k:]
    changed_later = int((~after).sum())
    if not bool(before.all()):
        j = int(torch.nonzero(~before)[0])
        diff = abs(float(nll[j]) - float(base_nll[j]))
        why = "a score used a later token or an update that saw one" if "C3" in name else "a score saw a later token"
        return Row(name, mode, cut, False, f"{int((~before).sum())} of {k} targets before the cut changed "
                   f"(first: target {j}, |dloss| = {diff:.3g}): {why}")
    if changed_later == 0:
        return Row(name, mode, cut, False, f"no loss after the cut changed ({len(after)} targets): "
                   f"the eval ignores its tokens, so this check saw nothing")
    return Row(name, mode, cut, True, f"{k} earlier losses bit-identical; {changed_later}/{len(after)} later changed")


def check_normalized(scored: list[Scored], tokens: Tensor, nll: Tensor, vocab_size: int, mode: str) -> Row:
    """C2: each recomputed distribution spans the full vocab, sums to 1, and gives the target the scored loss."""
    name, count, worst_sum, worst_p = "C2 normalized", 0, 0.0, 0.0
    for targets, logits in scored:
        if logits.size(-1) != vocab_size:
            return Row(name, mode, "-", False, f"logits span {logits.size(-1)} ids, not the full vocab {vocab_size}")
        probs = torch.softmax(logits.double(), dim=-1)
        if not bool(torch.isfinite(probs).all()):
            return Row(name, mode, "-", False, "non-finite logits")
        worst_sum = max(worst_sum, float((probs.sum(-1) - 1).abs().max()))
        p_target = probs.gather(1, tokens[targets + 1][:, None]).squeeze(1)
        worst_p = max(worst_p, float((torch.exp(-nll[targets]) - p_target).abs().nan_to_num(float("inf")).max()))
        count += len(targets)
    details = f"{count} targets: max |sum p - 1| = {worst_sum:.1e}, max |exp(-loss) - p(target)| = {worst_p:.1e}"
    if count == 0:
        return Row(name, mode, "-", False, "no scored targets to recompute")
    if worst_sum > PROB_TOL:
        return Row(name, mode, "-", False, details + " (softmax not normalized)")
    if worst_p > PROB_TOL:
        return Row(name, mode, "-", False, details + " (scored loss is not -log softmax of the prefix's logits)")
    return Row(name, mode, "-", True, details)


def check_eval(eval_fn: EvalFn, tokens: Tensor, cuts: list[tuple[str, int]], vocab_size: int, mode: str,
               seed: int = 0, probe_fn: ProbeFn | None = None,
               progress: Callable[[str], None] | None = None) -> list[Row]:
    """All four checks for one eval callable. probe_fn (C2) runs right after the unperturbed eval, so an adaptive
    eval can recompute with the state that run left behind."""
    name = "C1+C3 score-first" if mode == "ttt" else "C1 causality"
    n = tokens.numel() - 1
    try:
        nll, hits = eval_fn(tokens)
    except RuntimeError as e:  # evaluate / eval_ttt refuse a wrong target count
        return [Row("C4 single pass", mode, "-", False, f"eval raised: {str(e).splitlines()[0]}")]
    rows = [check_single_pass(hits, n, mode)]
    if probe_fn is not None:
        rows.append(check_normalized(probe_fn(tokens), tokens, nll, vocab_size, mode))
    for i, (label, k) in enumerate(cuts):
        if progress:
            progress(f"{mode}: cut {i + 1}/{len(cuts)} at {k}")
        rows.append(check_causal(eval_fn, tokens, nll, k, label, vocab_size, seed, mode, name))
    return rows


def window_logits(logits_fn: Callable[[Tensor], Tensor], tokens: Tensor, starts: np.ndarray, seq_len: int,
                  stride: int) -> list[Scored]:
    """Each window recomputed alone, its input built as score_windows builds it: (scored targets, their logits)."""
    n, out = tokens.numel() - 1, []
    for s in (int(v) for v in starts):
        pos = s + torch.arange(seq_len)
        keep = (pos < n) & (pos >= (0 if s == 0 else s + seq_len - stride))
        with torch.no_grad():
            logits = logits_fn(tokens[pos.clamp(max=n - 1)][None])[0].float()
        out.append((pos[keep], logits[keep]))
    return out


# -----------------------------------------------------------------------------
# the trainer's eval paths as callables
# -----------------------------------------------------------------------------


def _buffers(n: int) -> tuple[Tensor, Tensor]:
    return torch.full((n,), float("nan"), dtype=torch.float64), torch.zeros(n, dtype=torch.int64)


class SlidingEval:
    """Sliding-window eval exactly as train_gpt.evaluate runs it on one rank, with per-target outputs."""

    def __init__(self, model: train_gpt.GPT, cfg: train_gpt.Config, luts: tuple[Tensor, Tensor, Tensor],
                 batch_windows: int):
        self.model, self.cfg, self.luts, self.batch_windows = model, cfg, luts, batch_windows
        self.results: list[tuple[float, float]] = []  # (val_loss, val_bpb) of each run, the unperturbed one first

    def __call__(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        L, S = self.cfg.eval_seq_len, self.cfg.eval_stride
        nll, hits = _buffers(tokens.numel() - 1)
        starts = train_gpt.window_starts(tokens.numel() - 1, L, S)
        sums = train_gpt.score_windows(self.model.forward_logits, tokens, starts, L, S,
                                       train_gpt.EvalContext(self.luts, self.batch_windows), nll, hits)
        self.results.append(train_gpt.bpb_from_sums(sums))
        return nll, hits

    def probe(self, tokens: Tensor) -> list[Scored]:
        starts = train_gpt.window_starts(tokens.numel() - 1, self.cfg.eval_seq_len, self.cfg.eval_stride)
        pick = np.unique(starts[[0, len(starts) // 2, -1]])
        return window_logits(self.model.forward_logits, tokens, pick, self.cfg.eval_seq_len, self.cfg.eval_stride)


class TTTEval:
    """train_gpt.eval_ttt on a fresh model per run (TTT changes the weights); keeps the last run's model."""

    def __init__(self, load_model: Callable[[], train_gpt.GPT], cfg: train_gpt.Config,
                 luts: tuple[Tensor, Tensor, Tensor], batch_windows: int):
        self.load_model, self.cfg, self.luts, self.batch_windows = load_model, cfg, luts, batch_windows
        self.model: train_gpt.GPT | None = None
        self.results: list[tuple[float, float]] = []

    def __call__(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        nll, hits = _buffers(tokens.numel() - 1)
        self.model = self.load_model()
        self.results.append(train_gpt.eval_ttt(self.model, tokens, self.cfg,
                                               train_gpt.EvalContext(self.luts, self.batch_windows), nll_out=nll,
                                               hits_out=hits))
        return nll, hits

    def probe(self, tokens: Tensor) -> list[Scored]:
        """Chunk 0 with the artifact's weights (nothing trained yet) and the last chunk with the weights the run
        left, which are the ones that scored it (the last chunk is never trained on)."""
        L, S, C = self.cfg.eval_seq_len, self.cfg.eval_stride, self.cfg.ttt_chunk_tokens
        chunks = train_gpt.ttt_chunks(tokens.numel() - 1, L, S, C)
        assert self.model is not None, "probe() needs a finished run"
        out = window_logits(self.load_model().forward_logits, tokens, np.unique(chunks[0][[0, -1]]), L, S)
        if len(chunks) > 1:
            out += window_logits(self.model.forward_logits, tokens, np.unique(chunks[-1][[0, -1]]), L, S)
        return out


def default_cuts(num_targets: int, seq_len: int, stride: int, chunk_tokens: int, mode: str) -> list[tuple[str, int]]:
    """Four cuts per mode (each costs one full eval run) on the edges where an off-by-one leak would show. Every
    window ends on a multiple of stride, so a cut there (or one before) cannot see a leak inside a window, such as
    a lost causal mask: each mode also gets cuts off the stride grid."""
    num_chunks = -(-num_targets // chunk_tokens)
    mid_chunk = (num_chunks - 1) // 2 * chunk_tokens + min(chunk_tokens, num_targets) // 2 + stride // 2 + 1
    window_end = ("window end", seq_len + 3 * stride)  # also a stride boundary: window 3's scored span ends here
    candidates = {
        "sliding": [("inside first window", seq_len // 2 + 1), ("first window end", seq_len), window_end,
                    ("mid-chunk", mid_chunk)],
        "ttt": [window_end, ("mid-chunk", mid_chunk), ("chunk boundary-1", chunk_tokens - 1),
                ("chunk boundary+1", chunk_tokens + 1)],
    }[mode]
    seen: dict[int, str] = {}
    for label, k in candidates:
        if 1 <= k <= num_targets - 1 and k not in seen:
            seen[k] = label
    return [(label, k) for k, label in sorted(seen.items())]


# -----------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------


def load_config(config_path: Path | None, artifact: Path) -> tuple[train_gpt.Config, str]:
    """The run's Config: --config, else run_summary.json beside the artifact, else the environment."""
    path = config_path or (artifact.parent / "run_summary.json")
    if config_path is None and not path.is_file():
        try:
            return train_gpt.Config.from_env(), "environment (no run_summary.json beside the artifact)"
        except ValueError as e:
            raise CheckError(str(e)) from None
    if not path.is_file():
        raise CheckError(f"{path}: no such config file")
    try:
        raw = json.loads(path.read_text())["config"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckError(f"{path}: not a run_summary.json with a \"config\" object") from None
    known = {f.name for f in dataclasses.fields(train_gpt.Config)}
    if not isinstance(raw, dict) or (unknown := sorted(set(raw) - known)):
        raise CheckError(f"{path}: config keys unknown to this train_gpt.py: {unknown}")
    try:
        cfg = train_gpt.Config(**raw)
    except (TypeError, ValueError) as e:
        raise CheckError(f"{path}: {e}") from None
    missing = sorted(known - set(raw))
    return cfg, str(path) + (f" (defaults for {', '.join(missing)})" if missing else "")


def load_model_fn(artifact: Path, cfg: train_gpt.Config) -> Callable[[], train_gpt.GPT]:
    """A loader of fresh models from the artifact; fails early (CheckError) if the artifact does not fit cfg."""

    def load() -> train_gpt.GPT:
        return train_gpt.load_quantized_model(artifact, cfg, CPU)

    try:
        load()
    except ValueError as e:  # quant.ArtifactError
        raise CheckError(f"{artifact}: {str(e).splitlines()[0]}") from None
    except RuntimeError as e:  # load_state_dict(strict=True)
        raise CheckError(f"{artifact} does not fit the config's model shape: {str(e).splitlines()[-1].strip()}") from None
    return load


def format_table(rows: list[Row]) -> str:
    head = ("check", "mode", "cut", "result", "details")
    cells = [head] + [(r.check, r.mode, r.cut, "PASS" if r.ok else "FAIL", r.details) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(4)) + "  " + c[4] for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 7)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, required=True, help="the quantized model (final_model.int6.ptz)")
    ap.add_argument("--data-dir", type=Path, help="dataset dir with fineweb_val_*.bin (overrides DATA_PATH)")
    ap.add_argument("--tokenizer", type=Path, help="SentencePiece .model (overrides TOKENIZER_PATH)")
    ap.add_argument("--tokens", type=int, help="targets to evaluate from the start of val, rounded down to a multiple "
                    "of EVAL_SEQ_LEN (default: TTT_CHUNK_TOKENS + EVAL_SEQ_LEN, two chunks: the shortest stream where an "
                    "update precedes a score; at most all of val)")
    ap.add_argument("--mode", choices=("sliding", "ttt", "both"), default="both", help="which eval path to check")
    ap.add_argument("--config", type=Path, help="run_summary.json whose \"config\" is the run's Config (default: the "
                    "one beside the artifact, else env vars as train_gpt.py reads them)")
    ap.add_argument("--cuts", type=int, nargs="+", help="cut positions k (tokens after k are replaced), for every mode; "
                    "default, 4 per mode: inside and at the end of the first window, a window end (= stride boundary), a "
                    "mid-chunk position, chunk boundary -1 and +1")
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
            data = train_gpt.load_data(cfg)
        except RuntimeError:  # sentencepiece's parse error
            raise CheckError(f"{cfg.tokenizer_file}: not a SentencePiece model") from None
        luts, val = data.luts, data.val_tokens
        L, S, C = cfg.eval_seq_len, cfg.eval_stride, cfg.ttt_chunk_tokens
        if args.tokens is not None and args.tokens < L:
            raise CheckError(f"--tokens {args.tokens}: need at least one window of EVAL_SEQ_LEN={L}")
        n = min(args.tokens or C + L, val.numel() - 1) // L * L
        tokens = val[: n + 1]
        modes = ["sliding", "ttt"] if args.mode == "both" else [args.mode]
        cuts = {m: [("", k) for k in args.cuts] if args.cuts else default_cuts(n, L, S, C, m) for m in modes}
        if bad := [k for k in args.cuts or [] if not 1 <= k <= n - 1]:
            raise CheckError(f"cuts {bad} outside 1..{n - 1} (the evaluated targets)")
        if args.batch_windows < 1 or args.threads < 1:
            raise CheckError("--batch-windows and --threads must be >= 1")
        load = load_model_fn(args.artifact, cfg)
    except (CheckError, train_gpt.ShardError, FileNotFoundError, ValueError) as e:
        hint = "; the config came from env vars: pass --config run_summary.json" if cfg_source.startswith("env") else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    num_chunks = -(-n // C)
    print(f"artifact {args.artifact}; config from {cfg_source}")
    print(f"val prefix: {n} targets of {val.numel() - 1}; EVAL_SEQ_LEN={L} EVAL_STRIDE={S} TTT_CHUNK_TOKENS={C} "
          f"({num_chunks} chunk{'s' if num_chunks > 1 else ''}) TTT_LR={cfg.ttt_lr:g} TTT_EPOCHS={cfg.ttt_epochs}")
    for m in modes:
        print(f"{m} cuts: {', '.join(f'{k} ({label})' if label else str(k) for label, k in cuts[m])}")
    if num_chunks < 2 and args.mode != "sliding":
        print("warning: one TTT chunk: no update happens before a score; raise --tokens above TTT_CHUNK_TOKENS")

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
        ttt = TTTEval(load, cfg, luts, args.batch_windows)
        rows += check_eval(ttt, tokens, cuts["ttt"], cfg.vocab_size, "ttt", args.seed, ttt.probe, progress)
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
