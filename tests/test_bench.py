"""Cheap checks of the benchmark helpers (the benchmarks themselves are commands, not tests)."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from bench.common import md_table, median, spread
from bench.quant import baseline_int8, order0_bound, pack_int6
from bench.report import write_atomic
from bench.train import baseline_overrides
from quant import quantize_state_dict


def test_median_odd_even_and_empty() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    with pytest.raises(ValueError):
        median([])


def test_spread_shows_median_range_and_count() -> None:
    assert spread([1.0, 3.0, 2.0], ".1f") == "2.0 (1.0–3.0, n=3)"
    assert spread([1.5], ".2f") == "1.50 (n=1)"


def test_md_table_aligns_columns_and_marks_right_alignment() -> None:
    text = md_table(["name", "bytes"], [["gptq", "1,234"], ["baseline int8", "99"]])
    lines = text.splitlines()
    assert lines[0] == "| name          | bytes |"
    assert lines[1] == "| ------------- | ----: |"
    assert lines[3] == "| baseline int8 |    99 |"
    assert len({len(line) for line in lines}) == 1
    with pytest.raises(ValueError):
        md_table(["a", "b"], [["only one"]])


def test_pack_int6_packs_four_symbols_into_three_bytes() -> None:
    q = torch.tensor([-32, 31, 0, -1, 5], dtype=torch.int8)
    packed = pack_int6(q)
    assert len(packed) == 6  # 5 symbols padded to 8 -> 2 words of 3 bytes
    word = int.from_bytes(packed[:3], "little")
    assert [(word >> (6 * i)) & 63 for i in range(4)] == [32, 31, 0, 63]


def test_baseline_int8_matches_the_upstream_rule() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 300)
    state = {"m": w, "small": torch.randn(4)}
    deq, payload, bound = baseline_int8(state, passthrough_numel=100)
    clip = torch.quantile(w.abs(), 0.9999984, dim=1)
    step = (clip / 127).half().float()
    assert torch.all((deq["m"] - w.clamp(-clip[:, None], clip[:, None])).abs() <= step[:, None] / 2 + 1e-6)
    assert torch.equal(deq["small"], state["small"].half().float())
    assert len(payload) == 8 * 300 + 2 * 8 + 2 * 4  # int8 codes + fp16 scales + fp16 passthrough
    assert 0 < bound < len(payload) and len(zlib.compress(payload, 9)) > bound


def test_order0_bound_of_constant_codes_is_zero() -> None:
    state = {"m": torch.ones(4, 64)}  # every row quantizes to the same code and scale
    qts = quantize_state_dict(state, {}, method="rtn", passthrough_numel=16)
    assert order0_bound(qts) == 0.0


def test_baseline_overrides_express_the_baseline_on_tiny_config() -> None:
    import train_gpt as tg
    from bench.common import tiny_env

    cfg = tg.Config.from_env({**tiny_env(), **baseline_overrides(4)})
    assert (cfg.num_loops, cfg.xsa_last_n, cfg.mlp_mult, cfg.mlp_leaky_slope) == (0, 0, 2.0, 0.0)
    assert cfg.rope_dims == cfg.model_dim // cfg.num_heads and cfg.parallel_residual_start == cfg.num_layers
    assert not (cfg.skip_gates_enabled or cfg.ln_scale or cfg.muon_row_normalize)
    assert cfg.muon_wd == cfg.adam_wd == cfg.embed_wd == cfg.ema_decay == 0.0


def test_write_atomic_replaces_the_file(tmp_path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("old")
    write_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]


def test_features_bench_quick_run_times_every_arm(capsys) -> None:
    import math

    from bench.features import ALL, BASE, FEATURES, main, random_batch

    x, y = random_batch(1024, 3, 64, 4, seed=0)
    assert torch.equal(x[:, 1:], y[:, :-1])
    bos = torch.cat((x[:, :1], y), dim=1) == 1  # each row's 65 ids
    assert bos.sum(dim=1).tolist() == [4, 4, 4]
    assert main(["--quick"]) == 0
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")][2:]
    assert [r[0] for r in rows] == [BASE, *FEATURES, ALL]
    assert rows[0][-2:] == ["1", "1"]
    for r in rows[1:]:
        for cell in r[-2:]:  # wall / P's, CPU / P's: "median (min–max, n=2)"
            ratio = float(cell.split()[0])
            assert math.isfinite(ratio) and ratio > 0, r
    assert "**CPU train step time / P's model" in out


def _fake_run(tmp_path: Path, name: str, steps: int, pre: float, quant: float, log_text: str = "") -> object:
    from bench.common import TrainerRun

    log = tmp_path / f"{name}.txt"
    log.write_text(log_text)
    summary = dict(steps=steps, model_params=1000, bytes_model=250, bytes_total=300, log=str(log),
                   config=dict(train_batch_tokens=100), time_ledger=[dict(phase="train_loop", seconds=1.0)],
                   evals={"pre-quantization post-ema": dict(val_bpb=pre), "quantized": dict(val_bpb=quant)})
    return TrainerRun(tmp_path / name, summary, {}, 1.0)


def test_experiments_bench_reads_gate_lines_and_differences_each_doubling(tmp_path: Path) -> None:
    """The sweep's per-doubling deltas are each run minus the run with half its steps (not minus the first run), and
    the hybrid's gate trajectory comes from its `hybrid_gate` log lines only."""
    from bench.experiments import bits_per_param, gate_trajectory, sweep_table

    runs = [_fake_run(tmp_path, f"s{s}", s, 3.0, q) for s, q in ((10, 3.0), (20, 2.9), (40, 2.85))]
    table, heads = sweep_table({"pm1": runs})
    assert heads == ["pm1 -0.1000, -0.0500"], heads
    assert "+0.0000" not in table and "-0.0500" in table
    assert bits_per_param(runs[0]) == 2.0  # 250 bytes x 8 / 1000 params
    log = _fake_run(tmp_path, "h", 5, 3.0, 3.0, "train step:2 x:1\nhybrid_gate step:2 layer:0 mean:0.5100 codes:3/16\n"
                    "note hybrid_gate step:9 layer:0 mean:0.9\nhybrid_gate step:4 layer:0 mean:0.4800 codes:5/16\n")
    assert gate_trajectory(Path(log.summary["log"])) == [(2, 0.51), (4, 0.48)]
