"""Plan a config before renting GPUs: parameters, artifact bytes against the cap, the work of one train step, the
steps that fit the train budget and the eval seconds on 8xH100, from a roofline of the real code's kernels.

    python tools/estimate.py                       # the trainer's defaults (env vars override, as for the trainer)
    NUM_LAYERS=12 python tools/estimate.py --json  # a variant
    python tools/estimate.py --env-file configs/record_p.env
    python tools/estimate.py --record N            # a record profile, printed next to its logged numbers
    python tools/estimate.py --validate            # B, P and N: predicted vs logged, and what was fitted on what

The logic lives in tools/planner.py, tools/workcount.py and tools/artifact_size.py; docs/planner.md explains it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import train_gpt
from tools import artifact_size, planner
from tools import workcount as wc


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def build_profile(record: str | None, env_file: Path | None) -> planner.Profile:
    """The profile to plan: a record's, or a config read only through train_gpt.Config.from_env."""
    if record:
        return planner.profiles()[record]
    env = planner.read_env_file(env_file) if env_file else None
    return planner.custom_profile(train_gpt.Config.from_env(env))


def plan(p: planner.Profile, gpus: int, code_bytes: int) -> dict:
    k = planner.default_constants()
    cfg = p.cfg
    accum = train_gpt.grad_accum_steps(cfg, gpus)
    seqs = cfg.train_batch_tokens // (gpus * accum * cfg.train_seq_len)
    attn = planner.train_attention(p, gpus)
    works = {lp: planner._train_work(cfg, seqs, lp, attn) for lp in (False, True)}
    return dict(
        profile=p.name, title=p.title, constants=k.__dict__, fitted_on=planner.FITTED_ON,
        params=artifact_size.count_params(cfg), bytes=artifact_size.predict_bytes(cfg, code_bytes),
        work={("looping" if lp else "no_looping"): {f: dict(flops=w.total(f), bytes=w.total(f, "eager_bytes"),
                                                         fused_bytes=w.total(f, "bytes"), kernels=w.count(f))
                                                     for f in wc.FAMILIES if w.count(f)}
              for lp, w in works.items()},
        flop_counter_total={("looping" if lp else "no_looping"): w.flop_counter_total for lp, w in works.items()},
        train=planner.train_plan(p, k, gpus), eval=planner.eval_plan(p, k, gpus),
        logged=None if p.logged is None else dict(steps=p.logged.steps, step_ms_pre=p.logged.step_ms_pre,
                                                  step_ms_post=p.logged.step_ms_post, eval_s=p.logged.eval_s))


def render(r: dict, gpus: int) -> str:
    pr, b, tr, ev, lg = r["params"], r["bytes"], r["train"], r["eval"], r["logged"]
    out = [f"pgolf estimate: {r['title']} on {gpus}xH100 SXM"]
    out.append("\n1. parameters (counted on train_gpt.GPT)")
    out += [f"  {name:<16}{n:>13,}" for name, n in pr.items() if name != "total"]
    out.append(f"  {'total':<16}{pr['total']:>13,}")
    out.append(f"\n2. artifact bytes (cap {b['limit_bytes']:,}, decimal)")
    for cls, c in b["classes"].items():
        label = f"{cls} int{c['bits']}" if "bits" in c else f"{cls} fp16"
        n = c.get("codes", c.get("values"))
        out.append(f"  {label:<20}{n:>13,} values {c['compressed_bytes']:>14,.0f} bytes")
    out.append(f"  model {b['model_bytes']:,.0f} + code {b['code_bytes']:,} = {b['total_bytes']:,.0f}: headroom "
               f"{b['headroom_bytes']:+,.0f} bytes, " + ("FITS" if b["fits"] else "OVER THE CAP"))
    out.append("\n3. work of one train step per GPU (traced on the meta device; bytes eager / ideally fused)")
    for mode, fams in r["work"].items():
        out.append(f"  {mode}: " + ", ".join(f"{f} {v['flops'] / 1e12:.2f} TFLOP {v['bytes'] / 1e9:.1f}/"
                                               f"{v['fused_bytes'] / 1e9:.1f} GB" for f, v in fams.items()))
    out.append(f"\n4. training: budget {tr['budget_s']:.1f} s")
    out.append(f"  step before looping {1e3 * tr['step_s_pre']:.1f} ms, after {1e3 * tr['step_s_post']:.1f} ms"
               + (f" (logged ~{lg['step_ms_pre']:g} / {lg['step_ms_post'] or '-'} ms)" if lg else ""))
    parts = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in tr["parts_pre"].items())
    out.append(f"  step before looping, ms: {parts}")
    out.append(f"  steps {tr['steps']:,.0f} ({tr['steps_pre']:,.0f} + {tr['steps_post']:,.0f} looped), "
               f"{tr['tokens'] / 1e9:.2f} B tokens" + (f"; logged {', '.join(map(str, lg['steps']))}" if lg else ""))
    out.append("\n5. eval")
    if "ttt_chunks" in ev:
        out.append(f"  sliding {ev['sliding_s']:.1f} s ({ev['windows']:,} windows)" + (
            f", record P's chunk TTT {ev['ttt_s']:.1f} s (score {ev['ttt_score_s']:.1f} + adapt "
            f"{ev['ttt_adapt_s']:.1f}, {ev['ttt_chunks']:,} chunks)" if ev["ttt_chunks"] else ""))
    elif "batches" in ev:
        out.append((f"  sliding {ev['sliding_s']:.1f} s, " if "sliding_s" in ev else "  ")
                   + f"phased TTT {ev['total_s'] - ev.get('sliding_s', 0.0):.1f} s: {ev['batches']} batches, "
                   f"{ev['steps']:,} chunk steps, global phases {', '.join(f'{s:.1f}' for s in ev['global_phase_s'])} s")
    out.append(f"  total {ev['total_s']:.1f} s of {train_gpt.TIME_LIMIT_SECONDS:g} s"
               + (f"; logged {lg['eval_s']}" if lg and lg["eval_s"] else ""))
    k = r["constants"]
    out.append(f"\nconstants: MM_EFF {k['mm_eff']:.2f}, FUSE {k['fuse']:.4f}, EVAL_SLOW {k['eval_slow']:.3f}, "
               f"HOST_OP {1e6 * k['host_op_s']:.2f} us. Fitted: {r['fitted_on']}")
    return "\n".join(out)


def validation_table(rows: list[dict]) -> str:
    head = (f"{'record':<7}{'steps':>8}{'logged':>20}{'err':>8}{'ms pre':>8}{'logged':>8}{'ms post':>9}{'logged':>8}"
            f"{'eval s':>8}{'logged':>20}{'err':>8}")
    out = [head, "-" * len(head)]
    for r in rows:
        post = "-" if r["step_ms_post"] is None else f"{r['step_ms_post']:.1f}"
        ev = "-" if r["eval_s"] is None else f"{r['eval_s']:.1f}"
        out.append(f"{r['record']:<7}{r['steps']:>8,.0f}{'/'.join(map(str, r['steps_logged'])):>20}"
                   f"{_pct(r['steps_err']):>8}{r['step_ms_pre']:>8.1f}{r['step_ms_pre_logged']:>8g}{post:>9}"
                   f"{r['step_ms_post_logged'] or '-':>8}{ev:>8}{'/'.join(f'{s:g}' for s in r['eval_s_logged']) or '-':>20}"
                   f"{_pct(r['eval_err']):>8}")
    out.append(f"fitted on record P only: {planner.FITTED_ON}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Plan a config: params, artifact bytes, steps in the train budget and "
                                             "eval seconds on 8xH100, from a roofline of the real code's kernels.")
    ap.add_argument("--record", choices=sorted(planner.profiles()), help="plan a record profile (B, P or N)")
    ap.add_argument("--env-file", type=Path, help="read the config from this env file (through Config.from_env)")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs (global batch fixed; default 8)")
    ap.add_argument("--code-bytes", type=int, default=artifact_size.DEFAULT_CODE_BYTES,
                    help=f"packed code bytes counted in the artifact (default {artifact_size.DEFAULT_CODE_BYTES:,})")
    ap.add_argument("--validate", action="store_true", help="print B, P, N predicted vs logged and exit")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    try:
        if args.gpus < 1 or args.code_bytes < 0:
            raise ValueError("--gpus must be >= 1 and --code-bytes >= 0")
        if args.record and args.env_file:
            raise ValueError("give --record or --env-file, not both")
        if args.env_file and not args.env_file.is_file():
            raise ValueError(f"{args.env_file}: no such file")
        if args.validate:
            rows = planner.validation()
            print(json.dumps(rows, indent=1) if args.json else validation_table(rows))
            return 0
        result = plan(build_profile(args.record, args.env_file), args.gpus, args.code_bytes)
    except ValueError as e:
        print(f"estimate.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1, default=str) if args.json else render(result, args.gpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
