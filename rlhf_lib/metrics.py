"""The evaluation's metric table: every metric the evaluation reports, defined once — its key (in a report row and,
when the over-optimisation curve has it, in each point of the curve), how tables label and format it, which way is
better, whether `end`'s summary and the curve show it, and the function that computes it from a `Judging` (one
policy's answers, scored, beside SFT's).

`rlhf_lib/stages/evaluate.py` computes the table's rows and curve points, `rlhf_lib/report.py` draws its tables,
card and summary from it (the notebook uses report.py), and `rlhf_lib/guard.py` reads the curve through the keys
below. Adding a metric is one row here and the function that computes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable


@dataclass(frozen=True)
class Metric:
    key: str  # in a report row and a curve point
    label: str  # how tables and the summary name it
    compute: Callable[["Judging"], Any] | None  # None: filled in after the evaluation (the stage's wall time)
    fmt: str = ".3f"
    better: str | None = "higher"  # "higher", "lower" or None (neither)
    versus_sft: bool = False  # compares a policy with SFT: not computed for SFT itself
    summary: bool = False  # a figure of `end`'s summary line for each method
    curve: bool = False  # computed at every point of the over-optimisation curve
    origin: float | None = None  # its value at the curve's origin (SFT against itself) when it compares with SFT

    def show(self, value) -> str:
        """The value as tables show it ("—" when absent)."""
        if value is None:
            return "—"
        if isinstance(value, bool):
            return "YES" if value else "no"
        return format(value, self.fmt) if isinstance(value, (int, float)) else str(value)


class Judging:
    """What the metrics are computed from: one policy's answers to the held-out prompts, scored by both judges
    (`policy`, an evaluate.Judged), SFT's on the same prompts (`sft`), the gold judge, and — for the report rows, not
    the curve — the held-out SFT answers that perplexity is measured on ((prompts, answers))."""

    def __init__(self, policy, sft, gold, held_out: tuple[list[str], list[str]] | None = None):
        self.policy, self.sft, self.gold, self.held_out = policy, sft, gold, held_out
        self.n = len(policy.answers)

    @cached_property
    def sequence_kl(self) -> tuple[list[float], int]:
        """(KL(policy ‖ SFT) of each of the policy's own answers, the answers' total tokens): the log-prob of each
        answer under the policy minus under SFT, summed over its tokens."""
        from rlhf_lib import sampling

        p = self.policy
        own = sampling.answer_logprobs(p.model, p.tokenizer, p.prompts, p.tokens)
        ref = sampling.answer_logprobs(self.sft.model, self.sft.tokenizer, p.prompts, p.tokens)
        return [float((a - b).sum()) for a, b in zip(own, ref)], sum(len(a) for a in own)

    @cached_property
    def proxy_win_rate(self) -> float:
        return win_rate(self.policy.scores, self.sft.scores[:self.n])

    @cached_property
    def gold_win_rate(self) -> float | None:
        p, sft = self.policy, self.sft
        return self.gold.win_rate(p.questions, p.answers, sft.answers[:self.n], p.gold_scores,
                                  None if sft.gold_scores is None else sft.gold_scores[:self.n])


def share_won(wins, ties) -> float:
    """The share of comparisons won, a tie counting half (boolean tensors, one entry per comparison): every
    win-rate and pairwise accuracy of the project."""
    return float((wins.float() + 0.5 * ties.float()).mean())


def win_rate(scores, baseline) -> float:
    """Fraction of prompts where `scores` beats the baseline; ties count half."""
    return share_won(scores > baseline, scores == baseline)


# Proxy win-rate this far above a coin flip while the gold judge's stays at or below it: the policy is
# pleasing the reward model it optimised, not the preference behind it (Gao et al. 2022).
OVEROPT_PROXY_MARGIN = 0.05


def over_optimised(proxy_win_rate: float, gold_win_rate: float | None) -> bool:
    return gold_win_rate is not None and proxy_win_rate > 0.5 + OVEROPT_PROXY_MARGIN and gold_win_rate <= 0.5


def _gold_score(j: Judging) -> float | None:
    return None if j.policy.gold_scores is None else float(j.policy.gold_scores.mean())


def _kl_per_token(j: Judging) -> float:
    kls, tokens = j.sequence_kl
    return sum(kls) / max(tokens, 1)


def _kl_per_sequence(j: Judging) -> float:
    kls, _ = j.sequence_kl
    return sum(kls) / max(len(kls), 1)


def _perplexity(j: Judging) -> float:
    """exp(mean NLL per answer token) of the held-out SFT answers given their prompts."""
    import torch

    from rlhf_lib import sampling

    p = j.policy
    tok, (prompts, answers) = p.tokenizer, j.held_out
    responses = [torch.cat([tok(" " + a.strip(), add_special_tokens=False, return_tensors="pt")["input_ids"][0],
                            torch.tensor([tok.eos_token_id])]) for a in answers]
    logprobs = sampling.answer_logprobs(p.model, tok, prompts, responses)
    return math.exp(-sum(float(lp.sum()) for lp in logprobs) / max(sum(len(lp) for lp in logprobs), 1))


# Keys other modules read by name: the guard reads the curve through these.
PROXY_SCORE, GOLD_SCORE = "proxy_score", "gold_score"
PROXY_WIN_RATE, GOLD_WIN_RATE = "proxy_win_rate", "gold_win_rate"
KL_PER_SEQUENCE, OVER_OPTIMISED, STAGE_SECONDS = "kl_per_sequence", "over_optimised", "stage_seconds"

TABLE = (
    Metric(PROXY_SCORE, "proxy score", lambda j: float(j.policy.scores.mean()), summary=True, curve=True),
    Metric(GOLD_SCORE, "gold score", _gold_score, curve=True),
    Metric(PROXY_WIN_RATE, "proxy win-rate vs SFT", lambda j: j.proxy_win_rate, versus_sft=True, summary=True,
           curve=True, origin=0.5),
    Metric(GOLD_WIN_RATE, "gold win-rate vs SFT", lambda j: j.gold_win_rate, versus_sft=True, summary=True,
           curve=True, origin=0.5),
    Metric("kl_per_token", "KL/token", _kl_per_token, better="lower", versus_sft=True, curve=True, origin=0.0),
    Metric(KL_PER_SEQUENCE, "KL/sequence", _kl_per_sequence, better="lower", versus_sft=True, summary=True,
           curve=True, origin=0.0),
    Metric("perplexity", "perplexity", _perplexity, better="lower"),
    Metric(STAGE_SECONDS, "stage s", None, fmt=".1f", better=None),
    Metric(OVER_OPTIMISED, "over-optimised?", lambda j: over_optimised(j.proxy_win_rate, j.gold_win_rate),
           better=None, versus_sft=True, summary=True),
)
BY_KEY = {m.key: m for m in TABLE}
CURVE = tuple(m for m in TABLE if m.curve)


def row(j: Judging, baseline: bool) -> dict:
    """A report row: every metric of the table that applies (SFT, the baseline, has none that compare with SFT);
    a metric with no value (a gold score from a pairwise judge) is left out."""
    values = {m.key: m.compute(j) for m in TABLE if m.compute and not (baseline and m.versus_sft)}
    return {k: v for k, v in values.items() if v is not None}


def curve_point(j: Judging, step: int) -> dict:
    """One point of the over-optimisation curve: the curve's metrics of the checkpoint at `step` against SFT."""
    return {"step": step, **{m.key: m.compute(j) for m in CURVE}}


def curve_origin(sft_first: Judging) -> dict:
    """The curve's first point: SFT itself (step 0) — its own scores, and each comparison's value with itself."""
    return {"step": 0, **{m.key: m.origin if m.versus_sft else m.compute(sft_first) for m in CURVE}}


def summary_figures(method_row: dict, sft_row: dict) -> str:
    """The summary's figures of a method: each `summary` metric, SFT's value beside the method's where SFT has one."""
    parts = []
    for m in TABLE:
        if not m.summary or m.key not in method_row:
            continue
        if m.key == OVER_OPTIMISED:
            parts += ["OVER-OPTIMISED"] if method_row[m.key] else []
        elif m.versus_sft:
            parts.append(f"{m.label} {m.show(method_row[m.key])}")
        else:
            parts.append(f"{m.label} {m.show(sft_row.get(m.key))} -> {m.show(method_row[m.key])}")
    return "; ".join(parts)
