"""Judges other than the reward model the methods optimise.

- `rule_score`: the sample data's generating rule, computed from the text (helpful and polite beats plain, plain
  beats rude, an answer beats polite evasion). No method trains against it unless asked to, so on the sample
  data it is the *gold* judge of `evaluate`; `rule_reward` is the same rule as a reward function.
- `PairwiseJudge`: a causal LM that, following a constitution, says which of two answers is better. RLAIF uses
  it to rank pairs; `evaluate` can use one as the gold judge. It scores both orders (A/B and B/A) to cancel
  position bias and drops pairs where the two orders disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_lib.data import sample

_WORD = re.compile(r"[a-z0-9']+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _phrases(phrases: list[str]) -> list[list[str]]:
    return sorted({tuple(_words(p)) for p in phrases}, key=len, reverse=True)


_POLITE = _phrases(sample.POLITE_OPENERS + sample.POLITE_CLOSERS)
_RUDE = _phrases(sample.RUDE_OPENERS + sample.RUDE_CLOSERS)


def _strip_phrases(words: list[str], phrases) -> tuple[list[str], int]:
    """Remove every occurrence of each phrase (longest first); return the rest and how many were found."""
    found = 0
    for phrase in phrases:
        n, i, out = len(phrase), 0, []
        while i < len(words):
            if tuple(words[i:i + n]) == phrase:
                found, i = found + 1, i + n
            else:
                out.append(words[i])
                i += 1
        words = out
    return words, found


@dataclass(frozen=True)
class RuleVerdict:
    score: float
    polite: int
    rude: int
    answers: bool


def rule_verdict(answer: str) -> RuleVerdict:
    """The sample data's preference as a score: +3 for carrying an answer (words beyond the stock polite or rude
    phrases), +1 per polite phrase and −2 per rude phrase (each capped at 2). Polite 5 > plain 3 > evasive 2, and
    plain 3 > rude −1: the order of every chosen/rejected pair the generator writes."""
    words = _words(answer)
    words, polite = _strip_phrases(words, _POLITE)
    words, rude = _strip_phrases(words, _RUDE)
    answers = len(words) >= 2
    score = 3.0 * answers + min(polite, 2) - 2.0 * min(rude, 2)
    return RuleVerdict(score, polite, rude, answers)


def rule_score(answer: str) -> float:
    return rule_verdict(answer).score


def rule_scores(answers: list[str]) -> torch.Tensor:
    return torch.tensor([rule_score(a) for a in answers], dtype=torch.float32)


def rule_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """The sample data's rule as a reward function (`reward.function = "rlhf_lib.judges:rule_reward"`): texts in,
    floats out, the signature every online method (and TRL's reward functions) takes. A verifiable reward: no
    reward model, nothing to over-optimise but the rule itself."""
    return [rule_score(c) for c in completions]


# ---------------------------------------------------------------- a causal LM as a pairwise judge

JUDGE_TEMPLATE = ("{constitution}\n\nQuestion: {question}\n\nResponse A: {first}\n\nResponse B: {second}\n\n"
                  "Which response follows the principles better, A or B? The better response is")


def decide(pref_ab: torch.Tensor, pref_ba: torch.Tensor, calibrate: bool = True) -> tuple[torch.Tensor, float]:
    """Combine the judge's verdicts on both orders of each pair.

    `pref_ab[i]` is the judge's preference for the answer shown *first* when x is first (y second); `pref_ba[i]`
    the same with y first. A judge with position bias prefers "first" in both: with `calibrate`, its mean
    preference for the first slot (estimated over the batch, the contextual-calibration idea) is removed before
    comparing. Returns (labels, bias): +1 where x wins in both orders, −1 where y wins in both, 0 where the
    orders disagree (the pair is dropped)."""
    bias = float((pref_ab + pref_ba).mean() / 2) if calibrate and len(pref_ab) else 0.0
    x_first = pref_ab - bias  # > 0: x preferred when shown first
    x_second = -(pref_ba - bias)  # > 0: x preferred when shown second
    labels = torch.where((x_first > 0) & (x_second > 0), 1, torch.where((x_first < 0) & (x_second < 0), -1, 0))
    return labels, bias


class PairwiseJudge:
    """A causal LM judging pairs under a constitution: preference = log p(" A") − log p(" B") after the prompt."""

    def __init__(self, model, tokenizer, constitution: str, max_length: int = 512, batch_size: int = 8):
        self.model, self.tokenizer = model.eval(), tokenizer
        # Left truncation keeps the answers and the verdict's question; a small judge loses the constitution first.
        limit = getattr(model.config, "max_position_embeddings", None) or max_length
        self.constitution, self.max_length, self.batch_size = constitution.strip(), min(max_length, limit), batch_size
        self.token_a, self.token_b = self._first_token(" A"), self._first_token(" B")
        if self.token_a == self.token_b:
            raise ValueError("the judge's tokenizer cannot tell ' A' from ' B'")

    @classmethod
    def load(cls, ref: str, constitution_path: str | Path, max_length: int = 512, trust_remote_code: bool = False):
        from rlhf_lib import models

        model, tokenizer = models.policy_on_device(ref, trust_remote_code, padding_side="left")
        return cls(model, tokenizer, Path(constitution_path).read_text(), max_length)

    def _first_token(self, text: str) -> int:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][0]

    @torch.no_grad()
    def first_slot_preference(self, questions: list[str], first: list[str], second: list[str]) -> torch.Tensor:
        """log p(A) − log p(B) for each (question, first answer, second answer): > 0 prefers the first shown."""
        from rlhf_lib import rl

        texts = [JUDGE_TEMPLATE.format(constitution=self.constitution, question=q.strip(), first=a.strip(),
                                       second=b.strip()) for q, a, b in zip(questions, first, second)]
        tok, device = self.tokenizer, next(self.model.parameters()).device
        tok.padding_side, tok.truncation_side = "left", "left"
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = tok(texts[i:i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=self.max_length).to(device)
            logits = self.model(**enc, position_ids=rl.position_ids(enc["attention_mask"])).logits[:, -1].float()
            logp = torch.log_softmax(logits, -1)
            out.append((logp[:, self.token_a] - logp[:, self.token_b]).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def compare(self, questions: list[str], x: list[str], y: list[str], calibrate: bool = True
                ) -> tuple[torch.Tensor, float]:
        """Labels (+1 x better, −1 y better, 0 the orders disagree) and the position bias removed."""
        pref_ab = self.first_slot_preference(questions, x, y)
        pref_ba = self.first_slot_preference(questions, y, x)
        return decide(pref_ab, pref_ba, calibrate)
