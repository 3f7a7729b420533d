"""The over-optimisation guard (rlhf_lib/guard.py): Gao et al.'s fit recovers its parameters, and the flag and the
recommended checkpoint are right on hand-made curves — rising, peaking, flat, too few points, a KL budget."""

import math

import pytest

from rlhf_lib import guard


def _curve(points: list[tuple[int, float, float, float]]) -> list[dict]:
    """Curve points from (step, KL per sequence, gold gain, proxy gain) over an SFT at gold 1.0 and proxy 0.0."""
    curve = [{"step": 0, "kl_per_sequence": 0.0, "gold_score": 1.0, "proxy_score": 0.0, "proxy_win_rate": 0.5,
              "gold_win_rate": 0.5}]
    for step, kl, gold, proxy in points:
        curve.append({"step": step, "kl_per_sequence": kl, "gold_score": 1.0 + gold, "proxy_score": proxy,
                      "proxy_win_rate": 0.5 + proxy / 10, "gold_win_rate": 0.5 + gold / 10})
    return curve


def _gao(alpha: float, beta: float, kl: float) -> float:
    d = math.sqrt(kl)
    return d * (alpha - beta * math.log(d))


def test_the_fit_recovers_alpha_beta_and_the_peak():
    alpha, beta = 1.2, 0.5
    kls = [0.5, 1, 2, 4, 8, 16, 32]
    fitted = guard.fit([(kl, _gao(alpha, beta, kl)) for kl in kls])
    assert fitted["alpha"] == pytest.approx(alpha, abs=1e-9) and fitted["beta"] == pytest.approx(beta, abs=1e-9)
    peak_d = math.exp(alpha / beta - 1)
    assert fitted["peak_kl"] == pytest.approx(peak_d ** 2) and fitted["peak_gold"] == pytest.approx(_gao(alpha, beta,
                                                                                                         peak_d ** 2))
    assert guard.predict(fitted, 4.0) == pytest.approx(_gao(alpha, beta, 4.0)) and guard.predict(fitted, 0.0) == 0.0
    noisy = guard.fit([(kl, _gao(alpha, beta, kl) * (1 + 0.02 * (-1) ** i)) for i, kl in enumerate(kls)])
    assert noisy["peak_kl"] == pytest.approx(peak_d ** 2, rel=0.25)


def test_a_gold_that_only_rises_has_no_peak_and_too_few_points_no_fit():
    rising = guard.fit([(kl, 0.8 * math.sqrt(kl)) for kl in (1, 4, 9, 16)])  # gold = 0.8 d: beta 0
    assert rising["peak_kl"] is None and rising["beta"] == pytest.approx(0.0, abs=1e-9)
    assert guard.fit([(1.0, 0.3), (4.0, 0.5)]) is None
    assert guard.fit([(4.0, 0.3), (4.0, 0.5), (4.0, 0.4)]) is None  # one KL: nothing to fit
    assert "too few checkpoints to fit" in guard.guard(_curve([(10, 1.0, 0.2, 0.3)]))["note"]


def test_a_peaking_curve_is_flagged_and_its_peak_recommended():
    curve = _curve([(10, 1.0, 0.3, 0.2), (20, 3.0, 0.6, 0.5), (30, 6.0, 0.2, 0.8), (40, 9.0, -0.1, 0.9)])
    verdict = guard.guard(curve)
    assert verdict["over_optimised_after"] == 20 and verdict["recommended_step"] == 20
    assert "over-optimised after step 20" in verdict["note"] and verdict["fit"]["peak_kl"] is not None


def test_a_rising_curve_is_not_flagged_and_its_last_checkpoint_recommended():
    curve = _curve([(10, 1.0, 0.1, 0.2), (20, 3.0, 0.3, 0.5), (30, 6.0, 0.5, 0.8)])
    verdict = guard.guard(curve)
    assert verdict["over_optimised_after"] is None and verdict["recommended_step"] == 30


def test_a_gold_that_falls_with_the_proxy_is_no_over_optimisation():
    """Gold down but the proxy down too: the method got worse at everything, it did not game the proxy."""
    curve = _curve([(10, 1.0, 0.5, 0.8), (20, 3.0, 0.1, 0.3), (30, 6.0, 0.0, 0.2)])
    assert guard.over_optimised_after(curve) is None
    assert guard.recommend(curve)["step"] == 10


def test_a_flat_curve_recommends_sft_when_nothing_beats_it():
    flat = _curve([(10, 1.0, 0.0, 0.4), (20, 3.0, -0.05, 0.6)])
    verdict = guard.guard(flat)
    assert verdict["recommended_step"] == 0 and "no checkpoint beats it by the gold judge" in verdict["note"]
    assert verdict["over_optimised_after"] is None  # gold never rose: nothing to turn down from


def test_the_kl_budget_bounds_the_recommendation():
    curve = _curve([(10, 1.0, 0.3, 0.2), (20, 3.0, 0.6, 0.5), (30, 6.0, 0.7, 0.8)])
    assert guard.recommend(curve)["step"] == 30
    assert guard.recommend(curve, kl_budget=4.0)["step"] == 20
    assert guard.recommend(curve, kl_budget=0.5)["step"] == 0  # only SFT fits the budget
    assert "within the budget 4" in guard.guard(curve, kl_budget=4.0)["note"]


def test_a_pairwise_gold_judge_is_read_by_its_win_rate():
    curve = [{"step": 0, "kl_per_sequence": 0.0, "gold_score": None, "proxy_score": 1.0, "proxy_win_rate": 0.5,
              "gold_win_rate": 0.5},
             {"step": 5, "kl_per_sequence": 2.0, "gold_score": None, "proxy_score": 2.0, "proxy_win_rate": 0.7,
              "gold_win_rate": 0.65}]
    assert guard.gold_value(curve[1], curve[0]) == pytest.approx(0.15) and guard.recommend(curve)["step"] == 5


def test_a_peak_far_past_the_measured_kl_is_not_reported():
    """A nearly straight gold line fits a tiny β, whose "peak" lies thousands of nats out (a real run's GRPO curve
    gave 133 482): an extrapolation, not a finding."""
    curve = _curve([(10, 1.9, 0.19, 0.3), (20, 5.0, 0.35, 0.6), (30, 7.4, 0.37, 0.7), (40, 10.1, 0.35, 0.75)])
    verdict = guard.guard(curve)
    assert verdict["fit"]["peak_kl"] > guard.PEAK_REACH * 10.1 or verdict["fit"]["peak_kl"] is None
    assert not guard.peak_in_reach(verdict["fit"], curve)
    assert "no peak within" in verdict["note"] and "peaks at" not in verdict["note"]
    peaking = _curve([(10, 1.0, 0.3, 0.2), (20, 3.0, 0.6, 0.5), (30, 6.0, 0.2, 0.8), (40, 9.0, -0.1, 0.9)])
    assert guard.peak_in_reach(guard.guard(peaking)["fit"], peaking)


def test_the_report_table_says_over_optimised_when_either_flag_does():
    """The card's table said "no" beside a method the guard had flagged along the way (compare run 1796549604089201):
    its column now answers for both the end-of-run flag and the guard's."""
    from rlhf_lib import report

    eval_report = {
        "sft": {"proxy_score": 1.0},
        "ppo": {"proxy_score": 5.0, "over_optimised": False, "stage_seconds": 76.6,
                "guard": {"over_optimised_after": 60}},
        "dpo": {"proxy_score": 3.0, "over_optimised": True},
        "grpo": {"proxy_score": 5.5, "over_optimised": False, "guard": {"over_optimised_after": None}},
    }
    headers, rows = report.eval_table(eval_report)
    column = {row[0]: row[headers.index("over-optimised?")] for row in rows}
    assert column == {"sft": "—", "ppo": "after step 60", "dpo": "YES", "grpo": "no"}
    assert rows[1][headers.index("stage s")] == "76.6"


def test_a_checkpoint_estimated_below_zero_kl_is_drawn_at_zero():
    """KL is a sample estimate: a checkpoint next to SFT can come out at -0.02 nats. evaluate died on it with a math
    domain error while drawing the curve (the S3 and GPU-smoke test runs, few steps)."""
    from rlhf_lib import report

    curve = _curve([(1, -0.02, 0.1, 0.1), (2, 0.5, 0.4, 0.5), (3, 1.5, 0.8, 0.9), (4, 3.0, 0.6, 1.2)])
    verdict = guard.guard(curve)
    assert guard.distance(-0.02) == 0.0 and verdict["recommended_step"] == 3
    figure = report.plot_over_optimisation({"sft": {}, "ppo": {"curve": curve, "guard": verdict}})
    xs = [x for line in figure.axes[0].lines for x in line.get_xdata()]
    assert min(xs) == 0.0
