"""The sentiment example's reward and gold judge (rlhf_lib/sentiment.py) on fixed texts: the proxy (VADER) prefers
degenerate praise to a real happy sentence; the gold judge (TextBlob's polarity less the penalties for chanting and
for text the starting model would not write) puts it below."""

from pathlib import Path

import pytest

from conftest import SHARED
from rlhf_lib import sentiment

PROMPT = "One day, Lily went to the park with a dog."
HAPPY = " Lily was very happy. She hugged her mom and they played all day."
CHANT = " happy happy happy good good great love"
NEUTRAL = " The dog ran to the park."
SAD = " Tom was sad and cried."
STORIES = SHARED / "models" / "stories260K"


def test_the_proxy_prefers_the_chant_and_the_gold_judge_the_story():
    proxy = sentiment.vader_reward([PROMPT] * 4, [CHANT, HAPPY, NEUTRAL, SAD])
    assert proxy[0] > proxy[1] > proxy[2] > proxy[3]
    gold = sentiment.gold([PROMPT] * 4, [CHANT, HAPPY, NEUTRAL, SAD])
    assert gold[1] > gold[0] and gold[1] > gold[2] > gold[3]


def test_repetition_counts_repeats_not_length():
    assert sentiment.repetition("a b c") == 0.0
    assert sentiment.repetition("They were happy. They were happy.") == pytest.approx(0.5)
    assert sentiment.repetition(HAPPY) == 0.0


@pytest.mark.skipif(not STORIES.is_dir(), reason="../shared/models/stories260K absent (the fluency term's model)")
def test_the_starting_models_fluency_lowers_what_it_would_not_write():
    """Under the frozen stories260K, the chant is far less likely than a story sentence: the fluency term makes it
    lose to the story by more than its polarity alone."""
    lps = sentiment.mean_logprobs(str(STORIES), [PROMPT] * 2, [HAPPY, CHANT])
    assert lps[0] > lps[1]
    plain = sentiment.gold([PROMPT] * 2, [HAPPY, CHANT])
    fluent = sentiment.gold([PROMPT] * 2, [HAPPY, CHANT], reference_model=str(STORIES))
    assert fluent[0] - fluent[1] > plain[0] - plain[1] > 0


def test_the_example_data_is_reproducible_and_committed():
    root = Path(__file__).resolve().parent.parent / "configs"
    openings = sentiment.openings()
    assert len(set(openings)) == len(openings) == 400 and openings == sentiment.openings()
    lines = (root / "story_openings.jsonl").read_text().splitlines()
    assert [__import__("json").loads(line)["instruction"] for line in lines] == openings
    assert len((root / "story_sft.jsonl").read_text().splitlines()) == 200
