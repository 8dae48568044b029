"""The legality checks of tools/check_legality.py as a library: issue #1017's four conditions tested by perturbation
on the trainer's own eval path (train_gpt.score_windows / eval_ttt). The command's docstring describes each check."""

from __future__ import annotations

import dataclasses
import json
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
