"""Feature cost benchmark: CPU training step time of each of record N's model features, as a ratio to record P's model.

Run from the repo root as a module: `python -m bench.features [--repeats 6] [--steps 3]` (as a script, bench/quant.py
would shadow the quant package train_gpt imports); about 2 minutes. The model is configs/cpu_tiny.env's shape, built
in this process and fed one fixed batch of random token ids with a few BOS per row (so SmearGate's BOS fix and
document isolation have documents to cut); a step is `train_gpt.train_step` with `train_gpt.Optimizers` (fp32, SDPA,
eager, looped layers: the trainer's CPU path). The batch is cpu_tiny's TRAIN_SEQ_LEN with 8 sequences, a quarter of
its TRAIN_BATCH_TOKENS (--seqs): a full batch takes ~3 s per single-thread step, too few steps for 2 minutes.

Arms: P = the five feature switches at configs/record_p.env's values (P's model); each feature alone switched to the
trainer's default (record N's value); N = all five on. Every arm keeps its own model and optimizers; after the
warm-up they run round-robin: each repetition times --steps steps of every arm, in an order rotated by one per
repetition, so machine drift hits all arms alike. Both clocks are kept: wall time, and process CPU time (which a
shared machine's scheduler does not inflate: on one thread it is the step's own work). Per arm: the median ms per
step over repetitions; ratio = the median over repetitions of (arm ms / P's ms in the same repetition). One torch
thread by default (--threads).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable

import torch

from bench.common import ROOT, md_table, median, progress, spread, tiny_env
from tools.envfile import read_env_file

P_ENV = ROOT / "configs" / "record_p.env"

# arm name -> the Config switch (env name) that turns the feature on; its P value comes from configs/record_p.env,
# its N value is the trainer's default
FEATURES = {
    "smear gate": "SMEAR_GATE_ENABLED",
    "sparse attn gate": "SPARSE_ATTN_GATE_ENABLED",
    "two parallel lanes": "PARALLEL_LANES",
    "polar express NS": "MUON_NS",
    "doc isolation": "DOC_ISOLATION",
}
BASE, ALL = "P (all off)", "N (all on)"


def feature_values() -> tuple[dict[str, str], dict[str, str]]:
    """(P's values, N's values) of the five switches: configs/record_p.env's and train_gpt.Config's defaults."""
    import train_gpt as tg

    p_env = read_env_file(P_ENV)
    defaults = {f.name.upper(): f.default for f in dataclasses.fields(tg.Config)}
    off, on = {}, {}
    for key in FEATURES.values():
        if key not in p_env:
            raise SystemExit(f"bench/features.py: {key} missing from {P_ENV.relative_to(ROOT)}")
        off[key], on[key] = p_env[key], str(int(defaults[key]) if isinstance(defaults[key], bool) else defaults[key])
        if tg.Config.from_env({key: off[key]}) == tg.Config.from_env({key: on[key]}):
            raise SystemExit(f"bench/features.py: {key}={off[key]} (P) is the trainer's default: nothing to measure")
    return off, on


def arm_overrides() -> dict[str, dict[str, str]]:
    """Each arm's switch values (all five, explicitly), in table order: P, each feature alone, N."""
    off, on = feature_values()
    arms = {BASE: dict(off)}
    arms.update({name: {**off, key: on[key]} for name, key in FEATURES.items()})
    arms[ALL] = dict(on)
    return arms


def random_batch(vocab: int, seqs: int, seq_len: int, bos_per_row: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 (seqs, seq_len): uniform ids in [2, vocab) with `bos_per_row` BOS (id 1) at random positions of
    each row's seq_len + 1 tokens (so both x and y see documents start mid-row)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (seqs, seq_len + 1), generator=g, dtype=torch.int64)
    if bos_per_row > 0:
        pos = torch.rand(seqs, seq_len + 1, generator=g).argsort(dim=1)[:, :bos_per_row]
        ids.scatter_(1, pos, 1)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


@dataclasses.dataclass
class Arm:
    name: str
    overrides: dict[str, str]
    params: int
    step: Callable[[], float]  # one train step; returns its loss
    wall: list[float] = dataclasses.field(default_factory=list)  # wall ms per step, one value per repetition
    cpu: list[float] = dataclasses.field(default_factory=list)  # process CPU ms per step, same repetitions


def make_arm(name: str, overrides: dict[str, str], batch: tuple[torch.Tensor, torch.Tensor], seed: int) -> Arm:
    import train_gpt as tg

    env = {**tiny_env(), **overrides, "TRAIN_SEQ_LEN": str(batch[0].size(1)),
           "TRAIN_BATCH_TOKENS": str(batch[0].numel())}
    cfg = tg.Config.from_env(env)
    torch.manual_seed(seed)
    model = tg.GPT(cfg)
    model.looping = cfg.num_loops > 0  # the layout of most of a run (looping starts at ENABLE_LOOPING_AT)
    opts = tg.Optimizers(model, cfg)

    def step() -> float:
        return float(tg.train_step(model, opts, [batch], cfg.grad_clip_norm, contextlib.nullcontext))

    return Arm(name, overrides, sum(p.numel() for p in model.parameters()), step)


def time_steps(arm: Arm, steps: int) -> None:
    """Appends the wall and process CPU ms per step over `steps` steps to the arm; a non-finite loss is an error
    (a broken arm must not look fast)."""
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = arm.step()
    arm.wall.append(1000 * (time.perf_counter() - t) / steps)
    arm.cpu.append(1000 * (time.process_time() - c) / steps)
    if not math.isfinite(loss):
        raise SystemExit(f"bench/features.py: arm {arm.name!r} has a non-finite train loss ({loss})")


def run(arms: list[Arm], repeats: int, steps: int, warmup: int) -> None:
    """Warm-up steps for every arm, then `repeats` rounds of `steps` timed steps per arm, the order rotated by one
    each round. Fills arm.wall and arm.cpu."""
    for arm in arms:
        for _ in range(warmup):
            arm.step()
    for r in range(repeats):
        order = arms[r % len(arms):] + arms[: r % len(arms)]
        for arm in order:
            time_steps(arm, steps)
        progress(f"  repetition {r + 1}/{repeats} (wall / CPU ms per step): "
                 + ", ".join(f"{a.name} {a.wall[-1]:.0f} / {a.cpu[-1]:.0f}" for a in arms))


def ratios(arm: Arm, base: Arm, clock: str) -> list[float]:
    """Per repetition: the arm's ms per step / P's in the same repetition, on `clock` ("wall" or "cpu")."""
    return [a / b for a, b in zip(getattr(arm, clock), getattr(base, clock))]


def table(arms: list[Arm]) -> str:
    base = arms[0]
    rows = []
    for arm in arms:
        changed = [f"`{k}={v}`" for k, v in arm.overrides.items() if v != base.overrides[k]]
        what = ("configs/record_p.env's values" if not changed else
                "all five" if len(changed) == len(FEATURES) else ", ".join(changed))
        rows.append([arm.name, what, f"{arm.params:,}", spread(arm.wall, ".0f"), spread(arm.cpu, ".0f"),
                     *(["1"] * 2 if arm is base else [spread(ratios(arm, base, c), ".3f") for c in ("wall", "cpu")])])
    return md_table(["arm", "switches", "params", "wall ms / step", "CPU ms / step", "wall / P's", "CPU / P's"],
                    rows, "llrrrrr")


def headline(arms: list[Arm], threads: int) -> str:
    base, rest = arms[0], arms[1:]
    parts = [f"{a.name} {median(ratios(a, base, 'cpu')):.3f}" for a in rest]
    return (f"**CPU train step time / P's model (cpu_tiny shape, {threads} thread{'s' if threads > 1 else ''}, "
            "process CPU time)**: " + ", ".join(parts)
            + " (median of per-repetition ratios; above 1 = the feature costs time).")


def main(argv: list[str] | None = None) -> int:
    env = tiny_env()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=6, help="round-robin repetitions (one ratio per repetition)")
    p.add_argument("--steps", type=int, default=3, help="timed train steps per arm per repetition")
    p.add_argument("--warmup", type=int, default=1, help="untimed train steps per arm before the first repetition")
    p.add_argument("--seqs", type=int, default=8, help="sequences per step (configs/cpu_tiny.env's batch is "
                   f"{int(env['TRAIN_BATCH_TOKENS']) // int(env['TRAIN_SEQ_LEN'])})")
    p.add_argument("--seq-len", type=int, default=int(env["TRAIN_SEQ_LEN"]),
                   help="tokens per sequence (default: configs/cpu_tiny.env's TRAIN_SEQ_LEN)")
    p.add_argument("--bos-per-row", type=int, default=4, help="BOS tokens (id 1) per row of random ids")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadier on shared cores)")
    p.add_argument("--seed", type=int, default=1337, help="seed of the batch and of every arm's init")
    p.add_argument("--quick", action="store_true",
                   help="minimal size for a smoke test: 2 repetitions of 1 step, 1 warm-up step, 2 sequences of 64")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.warmup, args.seqs, args.seq_len = 2, 1, 1, 2, 64
    if min(args.repeats, args.steps, args.seqs, args.seq_len, args.threads) < 1 or args.warmup < 0 \
            or not 0 <= args.bos_per_row <= args.seq_len:
        p.error("need --repeats, --steps, --seqs, --seq-len, --threads >= 1, --warmup >= 0, "
                "0 <= --bos-per-row <= --seq-len")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        batch = random_batch(int(env["VOCAB_SIZE"]), args.seqs, args.seq_len, args.bos_per_row, args.seed)
        arms = [make_arm(name, over, batch, args.seed) for name, over in arm_overrides().items()]
        progress(f"features bench: {len(arms)} arms, {args.repeats} x {args.steps} timed steps each after "
                 f"{args.warmup} warm-up, batch {args.seqs} x {args.seq_len}, {args.threads} thread(s)")
        run(arms, args.repeats, args.steps, args.warmup)
    finally:
        torch.set_num_threads(threads)
    lines = [f"configs/cpu_tiny.env's model ({env['NUM_LAYERS']} layers x {env['MODEL_DIM']}d, {env['NUM_HEADS']} heads / "
             f"{env['NUM_KV_HEADS']} KV heads, vocab {env['VOCAB_SIZE']}, layers {env['LOOP_START']}..{env['LOOP_END']} "
             f"looped x{int(env['NUM_LOOPS']) + 1}, parallel from layer {env['PARALLEL_RESIDUAL_START']}) on random ids "
             f"with {args.bos_per_row} BOS per row; batch {args.seqs} x {args.seq_len} tokens; fp32, SDPA, eager; "
             f"{args.threads} torch thread{'s' if args.threads > 1 else ''}. A step is one `train_gpt.train_step` "
             f"(forward, backward, clip, Muon + AdamW); {args.warmup} warm-up step(s) per arm, then {args.repeats} "
             f"round-robin repetitions of {args.steps} step(s) per arm. Switches: P's are configs/record_p.env's, "
             "each other arm turns the named ones to the trainer's default (record N). ms: median (min–max, n) over "
             "repetitions; ratios: median of the per-repetition ratios to P (wall: elapsed time; CPU: process CPU time, "
             "not inflated by other processes on a shared machine).", "",
             table(arms), "", headline(arms, args.threads)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
