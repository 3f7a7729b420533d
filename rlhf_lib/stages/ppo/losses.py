"""The arithmetic of PPO for language models (Ziegler et al. 2019; classic TRL PPO), as pure tensor functions.

Shapes: `B` sequences × `T` response tokens. `mask` is 1 on real response tokens and 0 on padding (after EOS
or past a sequence's sampled length), always right-aligned padding within the response block.

Several processes: the update is defined on the *global* batch. `reduce` (a function summing a tensor over every
process; the identity on one) makes whitening use the global batch's statistics, and the losses take `tokens`, the
global token count of the optimizer step's rollouts, so the per-process losses add up to the global mean.
`tests/test_ppo_golden.py` checks these functions against trl 1.12's PPO on the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def no_reduce(x: torch.Tensor) -> torch.Tensor:
    """One process: the sum over processes is the value itself."""
    return x


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce = no_reduce) -> torch.Tensor:
    """Unbiased variance over the masked entries of every process's batch (Bessel's correction, as TRL)."""
    return _masked_moments(x, mask, reduce)[1]


def _masked_moments(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce) -> tuple[torch.Tensor, torch.Tensor]:
    m = mask.to(x.dtype)
    total = reduce(torch.stack([(x * m).sum(), m.sum()]))
    n = total[1]
    mean = total[0] / n.clamp(min=1)
    squares = reduce(((x - mean) ** 2 * m).sum())
    return mean, squares / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce: Reduce = no_reduce
                  ) -> torch.Tensor:
    """Normalise to unit variance (and zero mean when shift_mean) over the masked entries of the global batch
    (`reduce` sums over processes); padding -> 0."""
    mean, var = _masked_moments(x, mask, reduce)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def per_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -beta * (log pi(a_t) - log pi_ref(a_t)) on every response token, plus the reward-model score on
    the last real token. Returns (rewards [B, T], per-token KL [B, T]), both zero on padding."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    has_tokens = mask.sum(1) > 0
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows[has_tokens], last[has_tokens]] += scores[has_tokens].to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A zero after the
    last real token (the episode ends there). Returns (advantages, returns = advantages + values)."""
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * m
        advantages[:, t] = adv
        # On padding keep carrying zeros: the next real token (none, since padding is trailing) sees V=0.
        next_value = values[:, t] * m
        next_adv = adv
    returns = advantages + values
    return advantages.detach(), returns.detach()


def _token_mean(x: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """sum(x * mask) / tokens: the masked mean when `tokens` is None; with `tokens` = the global token count of
    an optimizer step, this process's share of that step's mean (the shares of every micro-batch on every process
    add up to it)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / (mask.sum() if tokens is None else tokens).clamp(min=1)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float, tokens: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate: mean over tokens of max(-A * r, -A * clip(r, 1-eps, 1+eps)); `tokens` as in
    `_token_mean`. Stats over the same tokens: the clipped fraction and approx-KL = ½·(log r)²."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = _token_mean(torch.maximum(unclipped, clipped), mask, tokens)
    stats = {
        "clipfrac": _token_mean((clipped > unclipped).to(logprobs.dtype), mask, tokens),
        "approx_kl": 0.5 * _token_mean(log_ratio ** 2, mask, tokens),
    }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float, tokens: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean over tokens of max((V - R)^2, (V_clipped - R)^2); `tokens` as above."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * _token_mean(torch.maximum(unclipped_err, clipped_err), mask, tokens)
    return loss, {"vf_clipfrac": _token_mean((clipped_err > unclipped_err).to(values.dtype), mask, tokens)}


@dataclass
class AdaptiveKLController:
    """beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) (Ziegler et al. 2019).

    `kl` is the batch mean of each sequence's summed per-token KL, `n` the number of sequences."""

    value: float
    target: float
    horizon: int

    def update(self, kl: float, n: int) -> float:
        proportional_error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = state["value"], state["target"], state["horizon"]


@dataclass
class FixedKLController:
    """A constant beta (adaptive_kl = false)."""

    value: float

    def update(self, kl: float, n: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]
