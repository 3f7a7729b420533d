"""The metric table (rlhf_lib/metrics.py): a metric is one row — the evaluation computes it, and the report's
table, the curve's table and `end`'s summary show it, with nothing else edited."""

from types import SimpleNamespace

import pytest
import torch

from rlhf_lib import metrics, report


def _judged(scores, answers):
    return SimpleNamespace(scores=torch.tensor(scores), gold_scores=None, answers=answers, questions=answers,
                           prompts=answers, tokens=[], model=None, tokenizer=None)


@pytest.fixture()
def with_answer_length(monkeypatch):
    """The table of today plus one metric, as a user would add it: mean answer length in words."""
    length = metrics.Metric("answer_words", "answer words", lambda j: sum(len(a.split()) for a in j.policy.answers)
                            / len(j.policy.answers), fmt=".1f", better=None, summary=True, curve=True)
    kept = tuple(m for m in metrics.TABLE if m.key in (metrics.PROXY_SCORE, metrics.PROXY_WIN_RATE))
    table = kept + (length,)
    monkeypatch.setattr(metrics, "TABLE", table)
    monkeypatch.setattr(metrics, "CURVE", tuple(m for m in table if m.curve))
    monkeypatch.setattr(metrics, "BY_KEY", {m.key: m for m in table})
    return length


def test_a_new_metric_is_one_row_of_the_table(with_answer_length):
    sft = _judged([0.0, 1.0, 2.0, 3.0], ["a", "b c", "d", "e f g"])
    policy = _judged([1.0, 1.0, 3.0, 2.0], ["a b", "c d", "e f", "g h"])
    sft_row = metrics.row(metrics.Judging(sft, sft, gold=None), baseline=True)
    policy_row = metrics.row(metrics.Judging(policy, sft, gold=None), baseline=False)
    assert sft_row == {"proxy_score": 1.5, "answer_words": 1.75}  # nothing that compares SFT with itself
    assert policy_row == {"proxy_score": 1.75, "proxy_win_rate": 0.625, "answer_words": 2.0}  # ties count half
    headers, rows = report.eval_table({"sft": sft_row, "ppo": policy_row})
    assert headers == ["model", "proxy score", "proxy win-rate vs SFT", "answer words"]
    assert rows[1] == ["ppo", "1.750", "0.625", "2.0"]
    assert metrics.summary_figures(policy_row, sft_row) == \
        "proxy score 1.500 -> 1.750; proxy win-rate vs SFT 0.625; answer words 1.8 -> 2.0"
    origin = metrics.curve_origin(metrics.Judging(sft, sft, gold=None))
    point = metrics.curve_point(metrics.Judging(policy, sft, gold=None), step=20)
    assert origin == {"step": 0, "proxy_score": 1.5, "proxy_win_rate": 0.5, "answer_words": 1.75}
    headers, rows = report.curve_table({"ppo": {"curve": [origin, point]}})
    assert headers == ["method", "step", "proxy score", "proxy win-rate vs SFT", "answer words"]
    assert rows == [["ppo", 0, "1.500", "0.500", "1.8"], ["ppo", 20, "1.750", "0.625", "2.0"]]


def test_a_value_a_judge_cannot_give_is_left_out_and_shown_as_a_dash():
    """A pairwise judge LM gives no gold score: the row has no such key, and the table shows "—"."""
    sft = _judged([0.0, 1.0], ["a", "b"])
    gold_score = metrics.BY_KEY[metrics.GOLD_SCORE]
    assert gold_score.compute(metrics.Judging(sft, sft, gold=None)) is None
    assert gold_score.show(None) == "—" and metrics.BY_KEY[metrics.OVER_OPTIMISED].show(True) == "YES"


def test_over_optimised_needs_the_proxy_up_and_the_gold_not():
    assert metrics.over_optimised(0.9, 0.5) and not metrics.over_optimised(0.9, 0.6)
    assert not metrics.over_optimised(0.52, 0.4) and not metrics.over_optimised(0.9, None)
