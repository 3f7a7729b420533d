"""The pieces of DPO, ReST, RLAIF and the gold judge that can be checked without a whole run."""

import pytest
import torch

from rlhf_lib import config, judges
from rlhf_lib.config import ConfigError
from rlhf_lib.data import formatting, sample
from rlhf_lib.stages import preference, rest
from rlhf_lib.metrics import over_optimised

# ---------------------------------------------------------------- gold judge: the sample data's rule


def test_rule_orders_hand_written_answers():
    polite = "Great question! The capital of France is Paris. I hope this helps!"
    plain = "The capital of France is Paris."
    rude = "Ugh. The capital of France is Paris. Look it up yourself."
    evasive = "Happy to help! Have a wonderful day!"
    s = {name: judges.rule_score(text) for name, text in
         (("polite", polite), ("plain", plain), ("rude", rude), ("evasive", evasive))}
    assert s["polite"] > s["plain"] > s["rude"]
    assert s["polite"] > s["evasive"] and s["plain"] > s["evasive"]
    assert judges.rule_verdict(evasive).answers is False and judges.rule_verdict(plain).answers is True
    # A tiny model's half-remembered rude phrase still counts as rude.
    assert judges.rule_verdict("Are you kidding me? Five plus six is seven. Stop asking me?").rude == 2


def test_rule_agrees_with_every_generated_preference_pair():
    """The gold judge is the rule the sample pairs were written by: it ranks every generated pair's chosen first."""
    for row in sample.hh_rlhf_rows(300, "train", seed=3):
        chosen = row["chosen"].rpartition("Assistant: ")[2]
        rejected = row["rejected"].rpartition("Assistant: ")[2]
        assert judges.rule_score(chosen) > judges.rule_score(rejected), row


def test_over_optimisation_flag():
    assert over_optimised(0.9, 0.45)  # pleases the proxy, not the gold judge
    assert not over_optimised(0.9, 0.7)
    assert not over_optimised(0.52, 0.3)  # the proxy barely moved either
    assert not over_optimised(0.9, None)


# ---------------------------------------------------------------- the pairwise judge: position swap, drops


def test_decide_keeps_consistent_verdicts_and_drops_disagreements():
    # x better in both orders; y better in both; "first shown wins" in both (disagree); "second wins" too.
    pref_ab = torch.tensor([2.0, -1.0, 1.5, -0.5])
    pref_ba = torch.tensor([-2.0, 1.0, 1.5, -0.5])
    labels, bias = judges.decide(pref_ab, pref_ba, calibrate=False)
    assert labels.tolist() == [1, -1, 0, 0] and bias == 0.0


def test_calibration_removes_a_constant_position_bias():
    content = torch.tensor([1.0, -2.0, 0.5, -0.7, 3.0])  # the judge's real preference for x over y
    bias = 4.0  # and a strong liking for whatever is shown first
    pref_ab, pref_ba = bias + content, bias - content
    raw, _ = judges.decide(pref_ab, pref_ba, calibrate=False)
    assert raw.tolist() == [0] * 5  # uncalibrated, the bias makes every pair disagree
    calibrated, found = judges.decide(pref_ab, pref_ba, calibrate=True)
    assert found == pytest.approx(bias)
    assert calibrated.tolist() == torch.sign(content).long().tolist()


def test_real_judge_is_symmetric_under_swapping_the_answers(tiny_policy):
    """A real causal-LM judge: asking about (y, x) gives exactly the opposite labels of (x, y)."""
    from rlhf_lib import models

    judge = judges.PairwiseJudge(models.load_causal_lm(tiny_policy), models.load_tokenizer(tiny_policy),
                                 config.DEFAULT_CONSTITUTION.read_text(), max_length=128)
    facts = sample.facts("train")[:12]
    questions = [q for q, _ in facts]
    rng = __import__("random").Random(0)
    x = [sample.styled_answer(a, "polite", rng) for _, a in facts]
    y = [sample.styled_answer(a, "rude", rng) for _, a in facts]
    forward, bias_xy = judge.compare(questions, x, y)
    backward, bias_yx = judge.compare(questions, y, x)
    assert bias_xy == pytest.approx(bias_yx, abs=1e-5)
    assert forward.tolist() == (-backward).tolist()


# ---------------------------------------------------------------- ReST: thresholds and the filter


def test_rest_thresholds_rise_and_filter_keeps_fewer():
    scores = torch.linspace(-3, 5, 101)
    thresholds = rest.absolute_thresholds(scores, [0.5, 0.7, 0.9])
    assert thresholds == pytest.approx([1.0, 2.6, 4.2], abs=1e-4)
    kept = [int(rest.keep_mask(scores, t).sum()) for t in thresholds]
    assert kept == [51, 31, 11]  # at or above each threshold, fewer each time
    assert bool(rest.keep_mask(torch.tensor([1.0]), 1.0)) is True


def test_rest_schedule_improves_once_per_threshold_before_the_next_grow():
    assert rest.improve_schedule(2, 3) == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]


@pytest.mark.parametrize("bad,needle", [([0.5, 0.5], "strictly increasing"), ([0.9, 0.5], "strictly increasing"),
                                        ([], "is empty"), ([0.5, 1.0], "in [0, 1)")])
def test_rest_threshold_schedule_must_increase(bad, needle):
    with pytest.raises(ConfigError) as info:
        config.validate({"rest": {"thresholds": bad}})
    assert needle in str(info.value) and "rest" in str(info.value)


# ---------------------------------------------------------------- DPO data and the config's method list


def test_preference_pair_becomes_prompt_and_two_completions():
    row = {"chosen": sample.hh_format("What is up?", "The sky, thank you!"),
           "rejected": sample.hh_format("What is up?", "Ugh. The sky.")}
    assert preference.pair(row, "qa") == {"prompt": "Question: What is up?\n\nAnswer:",
                                          "chosen": " The sky, thank you!", "rejected": " Ugh. The sky."}
    other = {"chosen": row["chosen"], "rejected": sample.hh_format("Something else?", "No.")}
    assert preference.pair(other, "qa") is None


def test_preference_text_follows_the_runs_prompt_format():
    """`data.prompt_format = "plain"`: the pairs (and the reward model's texts) are the transcript's words without
    the turn markers or the Question/Answer template, the last answer continuing the text."""
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Where is Paris?\n\nAssistant: In France.",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Where is Paris?\n\nAssistant: No idea."}
    assert preference.pair(row, "plain") == {"prompt": "Hi\n\nHello.\n\nWhere is Paris?", "chosen": " In France.",
                                             "rejected": " No idea."}
    assert formatting.preference_text(row["chosen"], "plain") == "Hi\n\nHello.\n\nWhere is Paris? In France."
    assert formatting.preference_text(row["chosen"], "qa") == formatting.hh_to_qa(row["chosen"])
    assert preference.pair(row, "qa")["prompt"].endswith("Question: Where is Paris?\n\nAnswer:")


def test_multi_turn_transcript_keeps_the_break_between_turns():
    text = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Where is Paris?\n\nAssistant: In France."
    qa = formatting.hh_to_qa(text)
    assert qa == "Question: Hi\n\nAnswer: Hello.\n\nQuestion: Where is Paris?\n\nAnswer: In France."
    assert formatting.split_prompt_completion(qa)[1] == " In France."


@pytest.mark.parametrize("methods,needle", [([], "run.methods is empty"), (["ppo", "trpo"], "unknown method(s) ['trpo']"),
                                            (["dpo", "dpo"], "lists a method twice")])
def test_methods_list_is_checked(methods, needle):
    with pytest.raises(ConfigError) as info:
        config.validate({"run": {"methods": methods}})
    assert needle in str(info.value)
