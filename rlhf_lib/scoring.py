"""Scoring text with a reward model through the reward model's own tokenizer.

The policy and the reward model need not share a tokenizer (OPT's BPE vs DeBERTa's SentencePiece in the
seed), so the policy's tokens are decoded to text and re-tokenised here, truncated to the reward model's
max length. Truncation drops tokens from the *left*: the answer being judged is at the end of the text, and a
long prompt must not push it out (two hh-rlhf transcripts that differ only in their last turn would otherwise
often score identically).
"""

from __future__ import annotations

import torch

from rlhf_lib.data.formatting import reward_text


@torch.no_grad()
def score_texts(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 32) -> torch.Tensor:
    """One scalar score per text (the num_labels=1 logit), float32, on the reward model's device."""
    model.eval()
    device = next(model.parameters()).device
    tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
    scores = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length).to(device)
        scores.append(model(**batch).logits[:, 0].float())
    return torch.cat(scores) if scores else torch.zeros(0, device=device)


def score_responses(model, tokenizer, prompts: list[str], responses: list[str], max_length: int,
                    batch_size: int = 32) -> torch.Tensor:
    """Scores of the decoded prompt + response (what PPO, ReST and the evaluation ask the reward model)."""
    texts = [reward_text(p, r) for p, r in zip(prompts, responses)]
    return score_texts(model, tokenizer, texts, max_length, batch_size)
