"""The legality checks of tools/check_legality.py as a library: issue #1017's four conditions tested by perturbation
on the trainer's own eval paths (train_gpt.score_windows; evals.phased_ttt.eval_phased_ttt). The command's docstring
describes each check."""

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
from data.shards import BOS_ID
from evals import phased_ttt
from tools import experiment_entry

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


def perturb_targets(tokens: Tensor, targets: Tensor, vocab_size: int, seed: int) -> Tensor:
    """A copy of tokens with the token each given target predicts (tokens[t+1]) replaced by a uniform random id
    other than BOS; BOS tokens stay, so the documents (and the phased TTT's schedule built from them) are kept."""
    out = tokens.clone()
    pos = targets + 1
    pos = pos[tokens[pos] != BOS_ID]
    ids = torch.randint(0, vocab_size - 1, (len(pos),), generator=torch.Generator().manual_seed(seed), dtype=tokens.dtype)
    out[pos] = ids + (ids >= BOS_ID).to(ids.dtype)
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
                 seed: int, mode: str, name: str, order: Tensor | None = None) -> Row:
    """C1 (and C3 for adaptive evals): losses of targets j < k are bit-identical after perturbing tokens > k. With
    `order` (every target index in the order an adaptive eval scores them), k is a position in that order: the
    targets order[k:] get new target tokens (BOS kept) and the losses of order[:k] must be bit-identical."""
    cut = f"{k} ({label})" if label else str(k)
    if order is None:
        nll, _ = eval_fn(perturb_after(tokens, k, vocab_size, seed + k))
        order = torch.arange(tokens.numel() - 1)
    else:
        nll, _ = eval_fn(perturb_targets(tokens, order[k:], vocab_size, seed + k))
    same = same_bits(nll, base_nll)[order]
    before, after = same[:k], same[k:]
    changed_later = int((~after).sum())
    if not bool(before.all()):
        j = int(order[torch.nonzero(~before)[0]])
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
               seed: int = 0, probe_fn: ProbeFn | None = None, progress: Callable[[str], None] | None = None,
               order: Tensor | None = None) -> list[Row]:
    """All four checks for one eval callable. probe_fn (C2) runs right after the unperturbed eval, so an adaptive
    eval can recompute with the state that run left behind. order: the adaptive eval's processing order of the
    targets (check_causal); cuts are then positions in it."""
    name = "C1+C3 score-first" if mode == "ttt" else "C1 causality"
    n = tokens.numel() - 1
    try:
        nll, hits = eval_fn(tokens)
    except RuntimeError as e:  # evaluate / eval_phased_ttt refuse a wrong target count
        return [Row("C4 single pass", mode, "-", False, f"eval raised: {str(e).splitlines()[0]}")]
    rows = [check_single_pass(hits, n, mode)]
    if probe_fn is not None:
        rows.append(check_normalized(probe_fn(tokens), tokens, nll, vocab_size, mode))
    for i, (label, k) in enumerate(cuts):
        if progress:
            progress(f"{mode}: cut {i + 1}/{len(cuts)} at {k}")
        rows.append(check_causal(eval_fn, tokens, nll, k, label, vocab_size, seed, mode, name, order))
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


class PhasedTTTEval:
    """evals.phased_ttt.eval_phased_ttt on a fresh model per run (its global phases change the weights), on one
    process, with per-target outputs; order() is the processing order its cuts refer to."""

    def __init__(self, load_model: Callable[[], train_gpt.GPT], cfg: train_gpt.Config,
                 luts: tuple[Tensor, Tensor, Tensor]):
        self.load_model, self.cfg, self.luts = load_model, cfg, luts
        self.results: list[tuple[float, float]] = []

    def __call__(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        nll, hits = _buffers(tokens.numel() - 1)
        model, c = self.load_model(), self.cfg
        adapters = lambda bsz, gen: train_gpt.TTTAdapters(model, bsz, c.ttt_lora_rank, c.ttt_lora_alpha, gen)
        self.results.append(phased_ttt.eval_phased_ttt(model, tokens, c, train_gpt.EvalContext(self.luts, 1), adapters,
                                                       nll_out=nll, hits_out=hits))
        return nll, hits

    def order(self, tokens: Tensor) -> Tensor:
        return phased_ttt.processing_order(tokens, self.cfg)

    def probe(self, tokens: Tensor) -> list[Scored]:
        """The first step (first batch, chunk 0 of its documents): scored with the artifact's weights, since nothing
        is trained before it and fresh adapters add exactly 0; each document's window recomputed alone."""
        c = self.cfg
        plan = phased_ttt.make_plan(tokens, c.ttt_batch_size, c.phased_ttt_prefix_docs, c.phased_ttt_num_phases)
        batch, model, out = plan.queue[0], self.load_model(), []
        for d in batch:
            start, length = plan.docs[d]
            rows = phased_ttt.chunk_rows(tokens, torch.tensor([start]), torch.tensor([length - 1]), 0, c.ttt_chunk_size,
                                         c.ttt_eval_seq_len, phased_ttt.context(0, c.ttt_chunk_size, c.ttt_eval_seq_len,
                                                                                False))
            with torch.no_grad():
                logits = model.forward_logits(rows.x)[0].float()
            out.append((rows.target[0][rows.score[0]], logits[rows.score[0]]))
        return out


def ttt_cuts(tokens: Tensor, cfg: train_gpt.Config) -> list[tuple[str, int]]:
    """Cuts in the phased TTT's processing order (each costs one full run) where a leak would show: inside the first
    step (an update before its score), the first target of the next chunk (an update that saw the chunk after),
    the first target of the second batch, and inside the first step after the first global phase (a phase that
    trained on documents not yet scored)."""
    c = cfg
    plan = phased_ttt.make_plan(tokens, c.ttt_batch_size, c.phased_ttt_prefix_docs, c.phased_ttt_num_phases)
    steps: list[list[int]] = []  # targets scored per step, per batch
    for batch in plan.queue:
        starts = torch.tensor([plan.docs[d][0] for d in batch])
        preds = torch.tensor([plan.docs[d][1] - 1 for d in batch])
        steps.append([int(r.score.sum()) for r in (phased_ttt.chunk_rows(
            tokens, starts, preds, ci, c.ttt_chunk_size, c.ttt_eval_seq_len,
            phased_ttt.context(ci, c.ttt_chunk_size, c.ttt_eval_seq_len, False))
            for ci in range(-(-int(preds.max()) // c.ttt_chunk_size)))])
    def mid_chunk(q: int) -> int:  # the middle of slot 0's first chunk in batch q (slot 0's targets come first)
        return min(c.ttt_chunk_size, plan.docs[plan.queue[q][0]][1] - 1) // 2 + 1

    candidates = [("first step, mid-chunk", mid_chunk(0)), ("next chunk", steps[0][0])]
    if len(steps) > 1:
        candidates.append(("second batch", sum(steps[0])))
    scored, done = 0, 0
    for r0 in range(0, len(plan.queue), c.ttt_lanes):
        done += sum(sum(s) for s in steps[r0 : r0 + c.ttt_lanes])
        scored += sum(len(b) for b in plan.queue[r0 : r0 + c.ttt_lanes])
        if plan.boundaries and scored >= plan.boundaries[0]:
            if r0 + c.ttt_lanes < len(plan.queue):
                candidates.append(("after phase 1, mid-chunk", done + mid_chunk(r0 + c.ttt_lanes)))
            break
    return _in_range(candidates, tokens.numel() - 1)


def _in_range(candidates: list[tuple[str, int]], num_targets: int) -> list[tuple[str, int]]:
    """The candidate cuts inside 1..num_targets-1, one label per position, sorted."""
    seen: dict[int, str] = {}
    for label, k in candidates:
        if 1 <= k <= num_targets - 1 and k not in seen:
            seen[k] = label
    return [(label, k) for k, label in sorted(seen.items())]


def default_cuts(num_targets: int, seq_len: int, stride: int) -> list[tuple[str, int]]:
    """Four sliding-window cuts (each costs one full eval run) on the edges where an off-by-one leak would show.
    Every window ends on a multiple of stride, so a cut there (or one before) cannot see a leak inside a window,
    such as a lost causal mask: two cuts are off that grid."""
    return _in_range([("inside first window", seq_len // 2 + 1), ("first window end", seq_len),
                      ("window end", seq_len + 3 * stride),  # also a stride boundary: window 3's scored span ends here
                      ("mid-stream", num_targets // 2 // stride * stride + stride // 2 + 1)], num_targets)


# -----------------------------------------------------------------------------
# CLI
# -----------------------------------------------------------------------------


def load_config(config_path: Path | None, artifact: Path) -> tuple[train_gpt.Config, str]:
    """The run's Config: --config, else run_summary.json beside the artifact, else the environment. A run of an
    experiment entry script (its log names experiments/<name>.py) gets that entry's Config class; the model is then
    loaded with the entry's classes (load_model_fn)."""
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
    try:
        found = experiment_entry.run_entry(path)
        cls = experiment_entry.load_entry(found[0]).PATCHES["Config"] if found else train_gpt.Config
    except experiment_entry.EntryError as e:
        raise CheckError(str(e)) from None
    known = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(raw, dict) or (unknown := sorted(set(raw) - known)):
        hint = "" if found or experiment_entry.run_log(path) else (" (an experiment's run? its log, which names the "
                                                                     "entry script, is not beside run_summary.json)")
        raise CheckError(f"{path}: config keys unknown to {found[0] if found else 'this train_gpt.py'}: {unknown}{hint}")
    try:
        cfg = cls(**raw)
    except (TypeError, ValueError) as e:
        raise CheckError(f"{path}: {e}") from None
    missing = sorted(known - set(raw))
    entry = f", entry {found[0]}" if found else ""
    return cfg, str(path) + entry + (f" (defaults for {', '.join(missing)})" if missing else "")


def load_model_fn(artifact: Path, cfg: train_gpt.Config) -> Callable[[], train_gpt.GPT]:
    """A loader of fresh models from the artifact; fails early (CheckError) if the artifact does not fit cfg."""

    def load() -> train_gpt.GPT:
        with experiment_entry.installed_for(cfg):  # an experiment's config loads the experiment's model
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
