"""The sentiment example (configs/sentiment.toml): a pretrained story model steered to happy continuations by a
sentiment scorer, and judged by another one that also asks for fluent text — the classic demonstration that RL
from a reward works (TRL's GPT-2 on movie reviews), and the textbook case of reward hacking.

- `vader_reward`, the proxy every online method optimises: VADER's compound score of the continuation (a lexicon
  and rules, in the vaderSentiment package; -1 to 1). It loves "happy happy happy good great love!!!" (0.98).
- `gold`, the judge none of them sees: TextBlob's polarity of the continuation (the pattern library's lexicon, not
  VADER's), less a penalty for text that is no longer a story — words repeated over and over, and (given the frozen
  starting model, as `evaluate` gives it) continuations that model finds unlikely. Degenerate praise scores low.
- `openings`, the prompts: story openings written from templates (a reproducible source the project owns, with no
  sentiment of their own), and `stories`, short neutral stories of the same kind for an SFT that keeps the
  pretrained model's skill. `python -m rlhf_lib.sentiment` writes both to configs/ (they are committed).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

_WORD = re.compile(r"[a-z']+")
REPEAT_FREE = 0.4  # a story repeats some words ("the", "and", a name); past this share of repeats it is a chant
REPEAT_WEIGHT = 2.0
FLUENT_LOGPROB = -3.5  # nats per token under the starting model; below it, text that model would not write
FLUENCY_WEIGHT = 0.5
_ANALYZER = None
_MODELS: dict = {}


def _vader():
    global _ANALYZER
    if _ANALYZER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _ANALYZER = SentimentIntensityAnalyzer()
    return _ANALYZER


def vader_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """VADER's compound sentiment of each continuation (-1 to 1): the proxy reward."""
    return [float(_vader().polarity_scores(c)["compound"]) for c in completions]


def polarity(text: str) -> float:
    """TextBlob's polarity (-1 to 1), from the pattern library's lexicon."""
    from textblob import TextBlob

    return float(TextBlob(text).sentiment.polarity)


def repetition(text: str) -> float:
    """The share of a text's words that repeat an earlier word (0 for a text of fewer than four words)."""
    words = _WORD.findall(text.lower())
    return 1.0 - len(set(words)) / len(words) if len(words) >= 4 else 0.0


def mean_logprobs(model_ref: str, prompts: list[str], completions: list[str]) -> list[float]:
    """Mean log-probability per token of each continuation given its opening, under a frozen causal LM."""
    import torch

    from rlhf_lib import models, sampling

    if model_ref not in _MODELS:
        _MODELS[model_ref] = models.policy_on_device(model_ref, device="cpu")
    model, tokenizer = _MODELS[model_ref]
    tokens = [torch.tensor(tokenizer(c, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id])
              for c in completions]
    return [float(lp.mean()) for lp in sampling.answer_logprobs(model, tokenizer, prompts, tokens)]


def gold(prompts: list[str], completions: list[str], reference_model: str | None = None, **kwargs) -> list[float]:
    """The gold judge: TextBlob polarity, less REPEAT_WEIGHT x the repeats past REPEAT_FREE, less FLUENCY_WEIGHT x
    how far the starting model's mean log-probability of the continuation falls below FLUENT_LOGPROB (when
    `reference_model` names it)."""
    scores = [polarity(c) - REPEAT_WEIGHT * max(0.0, repetition(c) - REPEAT_FREE) for c in completions]
    if reference_model:
        fluency = mean_logprobs(reference_model, prompts, completions)
        scores = [s + FLUENCY_WEIGHT * min(0.0, lp - FLUENT_LOGPROB) for s, lp in zip(scores, fluency)]
    return scores


# ------------------------------------------------------------------ the example's data

NAMES = ["Lily", "Tim", "Ben", "Mia", "Sam", "Anna", "Max", "Lucy", "Tom", "Sue", "Jack", "Emma", "Zoe", "Leo",
         "Kate", "Bob", "Amy", "Jake", "Sara", "Dan"]
ANIMALS = ["dog", "cat", "bird", "bunny", "frog", "duck", "bear", "fish", "mouse", "pony"]
PLACES = ["park", "garden", "forest", "beach", "house", "school", "farm", "lake", "shop", "hill"]
THINGS = ["ball", "box", "kite", "hat", "toy", "book", "car", "cup", "rock", "stick"]
OPENINGS = ["Once upon a time, there was a little {animal} named {name}.",
            "One day, {name} went to the {place} with a {animal}.",
            "{name} had a {thing} and took it to the {place}.",
            "There was a {animal} who lived near the {place}.",
            "{name} and {other} found a {thing} in the {place}.",
            "It was a sunny day, and {name} walked to the {place}.",
            "{name} saw a {animal} next to a {thing}.",
            "In the {place}, {name} looked for a {thing}."]
ENDINGS = ["{name} looked at the {thing}. Then {name} went home.", "The {animal} sat down. {name} sat down too.",
           "{name} walked to the {place}. The {thing} was on the ground.", "They went to the {place} and back."]


def _fill(template: str, rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    return template.format(name=name, other=other, animal=rng.choice(ANIMALS), place=rng.choice(PLACES),
                           thing=rng.choice(THINGS))


def openings(n: int = 400, seed: int = 0) -> list[str]:
    """`n` distinct story openings, in a fixed order (the evaluation holds out the first ones)."""
    rng, found = random.Random(f"openings-{seed}"), []
    while len(found) < n:
        text = _fill(rng.choice(OPENINGS), rng)
        if text not in found:
            found.append(text)
    return found


def stories(n: int = 200, seed: int = 1) -> list[dict]:
    """`n` short neutral stories of the same kind, as SFT rows: the opening, and its plain continuation."""
    rng = random.Random(f"stories-{seed}")
    return [{"question": _fill(rng.choice(OPENINGS), rng), "response": _fill(rng.choice(ENDINGS), rng)}
            for _ in range(n)]


def write(directory: Path) -> None:
    """configs/story_openings.jsonl (Alpaca-OrcaChat schema) and configs/story_sft.jsonl (OpenOrca schema)."""
    (directory / "story_openings.jsonl").write_text(
        "".join(json.dumps({"instruction": o, "input": "", "output": ""}) + "\n" for o in openings()))
    (directory / "story_sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stories()))


if __name__ == "__main__":
    from rlhf_lib.env import PROJECT_ROOT

    write(PROJECT_ROOT / "configs")
    print(f"wrote {PROJECT_ROOT / 'configs' / 'story_openings.jsonl'} and story_sft.jsonl")
