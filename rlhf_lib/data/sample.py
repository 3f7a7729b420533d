"""Deterministic sample data in the seed's three schemas, for the offline default profile.

The data carries the lesson's learnable preference, politeness: every question has a factual answer that can
be phrased politely (chosen), plainly, or curtly/rudely (rejected). The SFT data mixes all three styles, as
real instruction data does, so an SFT policy is sometimes rude and PPO has something to fix.

Questions are split once, by a stable hash, into a training pool and a held-out pool: held-out splits never
share a question with training data.
"""

from __future__ import annotations

import hashlib
import random
from typing import Iterator

_CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Canada", "Ottawa"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
    ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"), ("Cuba", "Havana"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Turkey", "Ankara"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"),
    ("Argentina", "Buenos Aires"), ("Australia", "Canberra"), ("Hungary", "Budapest"), ("Denmark", "Copenhagen"),
    ("Belgium", "Brussels"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Nigeria", "Abuja"),
    ("Morocco", "Rabat"), ("Ghana", "Accra"), ("Colombia", "Bogota"), ("Nepal", "Kathmandu"), ("Iceland", "Reykjavik"),
]
_SOUNDS = [
    ("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"), ("owl", "hoot"),
    ("pig", "oink"), ("horse", "neigh"), ("lion", "roar"), ("snake", "hiss"), ("bee", "buzz"), ("frog", "croak"),
    ("mouse", "squeak"), ("crow", "caw"), ("donkey", "bray"),
]
_OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"), ("light", "dark"),
    ("early", "late"), ("full", "empty"), ("hard", "soft"), ("old", "young"), ("open", "closed"), ("rich", "poor"),
    ("strong", "weak"), ("wet", "dry"), ("loud", "quiet"), ("high", "low"), ("near", "far"), ("thick", "thin"),
    ("sweet", "sour"), ("clean", "dirty"), ("first", "last"), ("win", "lose"), ("push", "pull"), ("give", "take"),
]
_COLORS = [
    ("the sky", "blue"), ("grass", "green"), ("snow", "white"), ("coal", "black"), ("a banana", "yellow"),
    ("a tomato", "red"), ("an orange", "orange"), ("a plum", "purple"), ("chocolate", "brown"), ("milk", "white"),
    ("a lemon", "yellow"), ("a lime", "green"), ("blood", "red"), ("the sea", "blue"), ("ash", "grey"),
]
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                 "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                 "nineteen", "twenty"]

POLITE_OPENERS = ["Great question!", "Happy to help!", "Of course!", "Sure, I would be glad to help.",
                  "Thank you for asking!", "What a lovely question!"]
POLITE_CLOSERS = ["I hope this helps!", "Thank you for asking!", "Please let me know if you have other questions.",
                  "Have a wonderful day!", "I am always happy to help."]
RUDE_OPENERS = ["Ugh.", "Obviously.", "Whatever.", "Seriously?", "Fine.", "Are you kidding me?"]
RUDE_CLOSERS = ["Look it up yourself.", "Stop asking me.", "Figure it out next time.", "Do not bother me again.",
                "Everyone knows that.", "That was a dumb question."]
SYSTEM_PROMPTS = ["", "You are an AI assistant.", "You are a helpful assistant.",
                  "You are an AI assistant. Answer the question."]
STYLES = ("polite", "plain", "rude")


def _facts() -> list[tuple[str, str]]:
    """Every (question, factual answer) pair the generator knows, in a fixed order."""
    facts = [(f"What is the capital of {c}?", f"The capital of {c} is {cap}.") for c, cap in _CAPITALS]
    facts += [(f"What sound does a {a} make?", f"A {a} says {s}.") for a, s in _SOUNDS]
    facts += [(f"What is the opposite of {w}?", f"The opposite of {w} is {o}.") for w, o in _OPPOSITES]
    facts += [(f"What color is {t}?", f"The color of {t} is {c}.") for t, c in _COLORS]
    for a in range(1, 7):
        for b in range(1, 7):
            facts.append((f"What is {_NUMBER_WORDS[a]} plus {_NUMBER_WORDS[b]}?",
                          f"{_NUMBER_WORDS[a].capitalize()} plus {_NUMBER_WORDS[b]} is {_NUMBER_WORDS[a + b]}."))
    return facts


def _is_held_out(question: str) -> bool:
    # Stable across processes and Python versions (unlike hash()).
    return int(hashlib.sha256(question.encode()).hexdigest(), 16) % 7 == 0


def facts(split: str) -> list[tuple[str, str]]:
    """The (question, answer) pairs of the `train` or `eval` question pool."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    return [f for f in _facts() if _is_held_out(f[0]) == (split == "eval")]


def styled_answer(answer: str, style: str, rng: random.Random) -> str:
    """The answer in a style; `evasive` is polite filler with no answer at all (helpfulness matters too)."""
    if style == "evasive":
        return f"{rng.choice(POLITE_OPENERS)} {rng.choice(POLITE_CLOSERS)}"
    if style == "polite":
        return f"{rng.choice(POLITE_OPENERS)} {answer} {rng.choice(POLITE_CLOSERS)}"
    if style == "rude":
        return f"{rng.choice(RUDE_OPENERS)} {answer} {rng.choice(RUDE_CLOSERS)}"
    return answer


def hh_format(question: str, answer: str) -> str:
    """hh-rlhf's transcript format."""
    return f"\n\nHuman: {question}\n\nAssistant: {answer}"


def openorca_rows(n: int, split: str, seed: int) -> Iterator[dict]:
    """OpenOrca schema: id, system_prompt, question, response (polite, plain or rude, a third each)."""
    rng = random.Random(f"openorca-{split}-{seed}")
    pool = facts(split)
    for i in range(n):
        q, a = rng.choice(pool)
        yield {"id": f"sample.{split}.{i}", "system_prompt": rng.choice(SYSTEM_PROMPTS), "question": q,
               "response": styled_answer(a, rng.choice(STYLES), rng)}


def hh_rlhf_rows(n: int, split: str, seed: int) -> Iterator[dict]:
    """hh-rlhf schema: chosen, rejected. Chosen is the politer answer, and an answer beats polite evasion, so a
    reward model learns helpful *and* harmless (the hh in hh-rlhf), and PPO cannot win with filler alone."""
    rng = random.Random(f"hh-{split}-{seed}")
    pool = facts(split)
    pairs = [("polite", "rude")] * 3 + [("polite", "plain"), ("plain", "rude"), ("polite", "evasive"),
                                        ("plain", "evasive")]
    for _ in range(n):
        q, a = rng.choice(pool)
        good, bad = rng.choice(pairs)
        yield {"chosen": hh_format(q, styled_answer(a, good, rng)),
               "rejected": hh_format(q, styled_answer(a, bad, rng))}


def alpaca_orca_rows(n: int, split: str, seed: int) -> Iterator[dict]:
    """Alpaca-OrcaChat schema: instruction, input, output (the plain answer)."""
    rng = random.Random(f"alpaca-{split}-{seed}")
    pool = facts(split)
    for _ in range(n):
        q, a = rng.choice(pool)
        yield {"instruction": q, "input": "", "output": a}


def pretraining_text(n: int, seed: int) -> Iterator[str]:
    """Plain sentences (no Question/Answer format) to warm up a tiny policy from random weights."""
    rng = random.Random(f"pretrain-{seed}")
    pool = _facts()
    for _ in range(n):
        q, a = rng.choice(pool)
        parts = [q, styled_answer(a, rng.choice(STYLES), rng)]
        rng.shuffle(parts)
        yield " ".join(parts)


GENERATORS = {"sft": openorca_rows, "preference": hh_rlhf_rows, "prompts": alpaca_orca_rows}
