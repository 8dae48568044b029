"""tools/stats.py: Welch t-test, the nats->bpb conversion and the seed planner, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from tools.stats import mean_std, nats_to_bpb, seeds_needed, tokens_per_byte, welch_one_sided


def t_sf_by_integration(t: float, df: float, intervals: int = 4000) -> float:
    """P(T >= t) = 1/2 - integral_0^t of the Student-t density, by Simpson's rule (independent of scipy)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def f(x: float) -> float:
        return c * (1 + x * x / df) ** (-(df + 1) / 2)

    h = t / intervals
    s = f(0.0) + f(t) + sum((4 if i % 2 else 2) * f(i * h) for i in range(1, intervals))
    return 0.5 - s * h / 3


def test_welch_hand_computed_case() -> None:
    # candidate [1,2,3]: mean 2, var 1; reference [4,6,8,10]: mean 7, var 20/3
    # a = 1/3, b = (20/3)/4 = 5/3, se^2 = 2 -> t = 5/sqrt(2); df = 4 / ((1/3)^2/2 + (5/3)^2/3) = 216/53
    r = welch_one_sided([1.0, 2.0, 3.0], [4.0, 6.0, 8.0, 10.0])
    assert (r.mean_candidate, r.mean_reference) == (2.0, 7.0)
    assert r.std_candidate == pytest.approx(1.0)
    assert r.std_reference == pytest.approx(math.sqrt(20 / 3))
    assert r.t == pytest.approx(5 / math.sqrt(2), rel=1e-12)
    assert r.df == pytest.approx(216 / 53, rel=1e-12)
    assert r.p == pytest.approx(t_sf_by_integration(5 / math.sqrt(2), 216 / 53), abs=1e-9)
    # textbook table, df = 4: t_0.99 = 3.747, t_0.975 = 2.776; df = 4.08 and t = 3.54 lie between
    assert 0.01 < r.p < 0.025


def test_welch_closed_form_df2() -> None:
    # candidate [1,1] has zero variance, so df = n_ref - 1 = 2 exactly, where sf(t) = 1/2 - t / (2 sqrt(2 + t^2))
    r = welch_one_sided([1.0, 1.0], [2.0, 3.0, 4.0])
    t = 2 / math.sqrt(1 / 3)
    assert r.t == pytest.approx(t)
    assert r.df == pytest.approx(2.0)
    assert r.p == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_welch_margin_and_direction() -> None:
    cand, ref = [1.0, 2.0, 3.0], [4.0, 6.0, 8.0, 10.0]
    with_margin = welch_one_sided(cand, ref, margin=1.0)
    assert with_margin.t == pytest.approx(4 / math.sqrt(2))  # (7 - 2 - 1) / sqrt(2)
    assert with_margin.p > welch_one_sided(cand, ref).p
    swapped = welch_one_sided(ref, cand)  # the worse sample as candidate: p mirrors
    assert swapped.p == pytest.approx(1 - welch_one_sided(cand, ref).p)


def test_welch_rejects_degenerate_input() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        welch_one_sided([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="zero variance"):
        welch_one_sided([1.0, 1.0], [2.0, 2.0])


def test_nats_to_bpb() -> None:
    assert nats_to_bpb(math.log(2), 1.0) == pytest.approx(1.0)
    # the 0.005-nat record rule at sp8192 (~0.268 tokens/byte) is ~0.0019 bpb
    assert nats_to_bpb(0.005, 0.268) == pytest.approx(0.005 / math.log(2) * 0.268)
    assert 0.00192 < nats_to_bpb(0.005, 0.268) < 0.00194
    assert tokens_per_byte(2.0, 1.0) == pytest.approx(math.log(2) / 2)
    # round trip through one eval line: bpb = loss / ln2 * tokens/byte
    tpb = tokens_per_byte(2.79180191, 1.08079352)
    assert nats_to_bpb(2.79180191, tpb) == pytest.approx(1.08079352)


def _sample(mean: float, std: float, n: int) -> list[float]:
    """n values with exactly this mean and sample standard deviation."""
    z = [i - (n - 1) / 2 for i in range(n)]
    s = mean_std(z)[1]
    return [mean + std * v / s for v in z]


def test_seeds_needed_agrees_with_welch_on_constructed_samples() -> None:
    std_c, std_r, n_ref, delta, margin = 0.0008, 0.0002, 3, 0.0025, 0.0019
    plan = seeds_needed(std_c, std_r, n_ref, delta, margin=margin)
    assert plan.n is not None and plan.n > 3
    ref = _sample(1.0810, std_r, n_ref)
    at_n = welch_one_sided(_sample(1.0810 - delta, std_c, plan.n), ref, margin=margin)
    before = welch_one_sided(_sample(1.0810 - delta, std_c, plan.n - 1), ref, margin=margin)
    assert at_n.p == pytest.approx(plan.p_at_n, rel=1e-6)
    assert at_n.p < 0.01 <= before.p
    assert str(plan.n) in plan.message


def test_seeds_needed_unreachable_says_so() -> None:
    # improvement only 0.0006 above the margin with 3 noisy reference seeds: p -> sf(t, 2) at t = 0.0006 / (0.0008/sqrt 3)
    plan = seeds_needed(0.0008, 0.0008, 3, 0.0025, margin=0.0019, max_n=50)
    t = 0.0006 / (0.0008 / math.sqrt(3))
    assert plan.n is None and plan.p_at_n is None
    assert plan.p_limit == pytest.approx(0.5 - t / (2 * math.sqrt(2 + t * t)), rel=1e-9)
    assert plan.best_p >= 0.01
    assert "unreachable" in plan.message and "50" in plan.message
    with pytest.raises(ValueError, match="2 seeds"):
        seeds_needed(0.001, 0.001, 1, 0.01)


def _write_log(path, seed: int, loss: float, bpb: float) -> None:
    """A minimal record-format log: a seed line and the final TTT eval line (project fixture, written here)."""
    path.write_text(f"Hyperparameters:\n  seed: {seed}\n  vocab_size: 8192\n"
                    f"quantized_ttt val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:1000ms\n")


def test_cli_welch_between_two_folders(tmp_path, capsys) -> None:
    from tools.stats import main

    ref, cand = tmp_path / "ref", tmp_path / "cand"
    ref.mkdir()
    cand.mkdir()
    tpb = 0.268
    for i, (r, c) in enumerate(((1.0808, 1.0760), (1.0810, 1.0763), (1.0812, 1.0758))):
        _write_log(ref / f"train_seed{i}.log", i, r * math.log(2) / tpb, r)
        _write_log(cand / f"train_seed{i}.log", i, c * math.log(2) / tpb, c)
    assert main(["--candidate", str(cand), "--reference", str(ref)]) == 0
    out = capsys.readouterr().out
    expected = welch_one_sided([1.0760, 1.0763, 1.0758], [1.0808, 1.0810, 1.0812], nats_to_bpb(0.005, tpb))
    assert f"p = {expected.p:.2g}" in out and f"t = {expected.t:.3f}" in out
    assert "required margin 0.00193 bpb (= 0.005 nats)" in out and "significant at p < 0.01" in out
    assert "NOT significant" not in out


def test_cli_errors_are_one_line(tmp_path) -> None:
    import subprocess
    import sys

    one = tmp_path / "one"
    one.mkdir()
    _write_log(one / "a.log", 1, 2.79, 1.08)
    proc = subprocess.run([sys.executable, "-m", "tools.stats", "--candidate", str(one), "--reference", str(one)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "at least 2 logs" in proc.stderr and "Traceback" not in proc.stderr
    helped = subprocess.run([sys.executable, "tools/stats.py", "--help"], capture_output=True, text=True,
                            cwd=__import__("pathlib").Path(__file__).resolve().parent.parent)
    assert helped.returncode == 0 and "--candidate" in helped.stdout
