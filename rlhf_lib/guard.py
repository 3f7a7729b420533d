"""The over-optimisation guard: from a method's curve (every saved checkpoint judged by the proxy and the gold
judge against its KL from SFT), when to stop and which checkpoint to ship.

- The fit: Gao et al. (2022)'s form for RL, gold(d) = d(α − β·ln d), d = √KL(checkpoint ‖ SFT), on the gold judge's
  gain over SFT. With β > 0 it peaks at d* = exp(α/β − 1): the KL past which more optimisation loses gold.
- The flag: the measured gold rose above SFT's, then fell over the last checkpoints (below its best by more than a
  tenth of its range) while the proxy still rose — "over-optimised after step N", N the best checkpoint by gold.
- The recommendation: the checkpoint with the best gold within `eval.kl_budget` nats per sequence (no budget: the
  best gold). SFT itself (step 0) is a candidate: when no checkpoint beats it by the gold judge, that is the answer.

The gold value of a checkpoint is its mean gold score minus SFT's when the gold judge scores (a rule, a reward model, a
function), else its gold win-rate over SFT minus one half (a pairwise judge LM).
"""

from __future__ import annotations

import math

from rlhf_lib.metrics import GOLD_SCORE, GOLD_WIN_RATE, KL_PER_SEQUENCE as KL, PROXY_SCORE, PROXY_WIN_RATE

MIN_FIT_POINTS = 3  # checkpoints past SFT needed to fit two parameters with a residual left
FALL_FRACTION = 0.1  # gold below its best by more than this share of its range: it has turned down
PEAK_REACH = 4.0  # a fitted peak past this many times the largest measured KL is an extrapolation, not a finding


def gold_value(point: dict, sft: dict) -> float | None:
    """A curve point's gold gain over SFT (see the module doc); None when the gold judge said nothing."""
    if point.get(GOLD_SCORE) is not None and sft.get(GOLD_SCORE) is not None:
        return point[GOLD_SCORE] - sft[GOLD_SCORE]
    if point.get(GOLD_WIN_RATE) is not None:
        return point[GOLD_WIN_RATE] - 0.5
    return None


def proxy_value(point: dict, sft: dict) -> float:
    if point.get(PROXY_SCORE) is not None and sft.get(PROXY_SCORE) is not None:
        return point[PROXY_SCORE] - sft[PROXY_SCORE]
    return point[PROXY_WIN_RATE] - 0.5


def distance(kl: float) -> float:
    """d = √KL, the curve's x axis. KL is estimated from samples (mean log-ratio of sampled sequences), which can
    come out a little below 0 for a checkpoint still next to SFT: its distance is then 0."""
    return math.sqrt(max(kl, 0.0))


def fit(points: list[tuple[float, float]]) -> dict | None:
    """Least squares of gold(d) = d(α − β ln d) on (KL per sequence, gold gain) points: linear in (α, β) once
    divided by d (gold/d = α − β ln d). None with fewer than MIN_FIT_POINTS points past KL 0 (or all at one KL)."""
    xs, ys = [], []
    for kl, gain in points:
        if kl > 0 and gain is not None:
            d = distance(kl)
            xs.append(math.log(d))
            ys.append(gain / d)
    if len(xs) < MIN_FIT_POINTS or max(xs) - min(xs) < 1e-9:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    alpha, beta = my - slope * mx, -slope
    peak_d = math.exp(alpha / beta - 1) if beta > 0 else None
    return {"alpha": alpha, "beta": beta, "peak_kl": peak_d ** 2 if peak_d else None,
            "peak_gold": peak_d * (alpha - beta * math.log(peak_d)) if peak_d else None, "points": len(xs)}


def predict(fitted: dict, kl: float) -> float:
    """The fitted gold gain at a KL (0 at KL 0)."""
    if kl <= 0:
        return 0.0
    d = distance(kl)
    return d * (fitted["alpha"] - fitted["beta"] * math.log(d))


def over_optimised_after(curve: list[dict]) -> int | None:
    """The step after which gold fell while the proxy kept rising (see the module doc), else None."""
    sft = curve[0]
    golds = [gold_value(p, sft) for p in curve]
    if len(curve) < 3 or any(g is None for g in golds):
        return None
    best = max(range(len(curve)), key=lambda i: (golds[i], -i))
    span = max(golds) - min(golds)
    fell = golds[-1] < golds[best] - FALL_FRACTION * span if span > 0 else False
    proxy_rose = proxy_value(curve[-1], sft) > proxy_value(curve[best], sft)
    # A gold that never rose above SFT's is not said to turn down (the end-of-run flag speaks of proxy-only gains).
    return curve[best]["step"] if 0 < best < len(curve) - 1 and fell and proxy_rose else None


def peak_in_reach(fitted: dict | None, curve: list[dict]) -> bool:
    """The fit has a peak, at most PEAK_REACH times the largest KL measured."""
    far = max(p[KL] for p in curve)
    return bool(fitted and fitted["peak_kl"] is not None and fitted["peak_kl"] <= PEAK_REACH * far)


def recommend(curve: list[dict], kl_budget: float = 0.0) -> dict:
    """The checkpoint to ship: the best gold within `kl_budget` nats per sequence (0: no budget); the least KL
    among equals. Returns its curve point (step 0 is SFT)."""
    sft = curve[0]
    allowed = [p for p in curve if not kl_budget or p[KL] <= kl_budget] or [sft]
    scored = [(gold_value(p, sft), -p[KL], -p["step"], p) for p in allowed]
    scored = [s for s in scored if s[0] is not None] or [(0.0, 0.0, 0, sft)]
    return max(scored, key=lambda s: s[:3])[3]


def guard(curve: list[dict], kl_budget: float = 0.0) -> dict:
    """The guard's verdict on one method's curve: the fit, the flag, the recommended checkpoint, in words too."""
    sft = curve[0]
    fitted = fit([(p[KL], gold_value(p, sft)) for p in curve[1:]])
    after = over_optimised_after(curve)
    best = recommend(curve, kl_budget)
    last = curve[-1]
    words = [f"recommended: step {best['step']}" + (" (SFT: no checkpoint beats it by the gold judge)"
                                                     if best["step"] == 0 else "")
             + f", KL {best[KL]:.2f} nats/seq" + (f" within the budget {kl_budget:g}" if kl_budget
                                                                 else "")]
    if after is not None:
        words.append(f"over-optimised after step {after}: gold fell since while the proxy kept rising")
    if fitted and peak_in_reach(fitted, curve):
        words.append(f"fitted gold peaks at KL {fitted['peak_kl']:.2f} nats/seq")
    elif fitted:
        words.append("fitted gold still rising over the measured KL (no peak within "
                     f"{PEAK_REACH:g}x the largest)")
    else:
        words.append(f"too few checkpoints to fit ({len(curve) - 1}; {MIN_FIT_POINTS} needed)")
    return {"recommended_step": best["step"], "recommended": best, "last_step": last["step"],
            "over_optimised_after": after, "fit": fitted, "kl_budget": kl_budget, "note": "; ".join(words)}
