"""The math under every log-prob: position ids over real tokens, a token's log-prob and a distribution's entropy
from logits. Sampling and response log-probs are rlhf_lib/sampling.py; the judge LM (rlhf_lib/judges.py) uses
these too."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under softmax(logits); logits [B, T, V], tokens [B, T] -> [B, T]. Computed as the token's
    logit minus the log-sum-exp, in at least float32, without materialising the whole log-softmax."""
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return torch.gather(logits, 2, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
