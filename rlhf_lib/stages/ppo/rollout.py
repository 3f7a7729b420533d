"""Rollouts: sample responses with per-sequence lengths, score them with the reward model's own tokenizer.

Layout of a rollout batch (what the losses index into):

    input_ids = [ left-padded prompt (P) | response (T), right-padded ]
    attention = [ 0 … 0 1 … 1            | 1 … 1 0 … 0                 ]

Position ids come from the attention mask (`rlhf_lib.rl.position_ids`), so left padding does not shift them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig



@dataclass
class RolloutBatch:
    """One PPO step's rollouts: what `trainer.ppo_step` consumes."""

    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]
    response_mask: torch.Tensor  # [B, T]
    prompt_length: int  # P
    scores: torch.Tensor  # [B], reward-model scores


def response_mask(responses: torch.Tensor, lengths: list[int], eos_token_id: int | None, stop_at_eos: bool
                  ) -> torch.Tensor:
    """1 on the tokens each sequence keeps: the first `lengths[i]` tokens, cut after the first EOS (kept) when
    stop_at_eos. Generation pads finished sequences with pad_token_id; those never count."""
    B, T = responses.shape
    idx = torch.arange(T, device=responses.device).unsqueeze(0)
    mask = idx < torch.tensor(lengths, device=responses.device).unsqueeze(1)
    if stop_at_eos and eos_token_id is not None:
        is_eos = (responses == eos_token_id) & mask
        # Tokens strictly after the first EOS are dropped; the EOS itself is the last action.
        after_first_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        mask &= ~after_first_eos
    return mask.long()


def sample_lengths(n: int, low: int, high: int, generator: torch.Generator) -> list[int]:
    """Response lengths drawn uniformly from [low, high] (the seed's LengthSampler)."""
    return torch.randint(low, high + 1, (n,), generator=generator).tolist()


def generation_config(model, tokenizer, max_new_tokens: int, stop_at_eos: bool) -> GenerationConfig:
    """Pure sampling from the policy (top_k=0, top_p=1, no logits processor), so the rollout distribution is
    exactly the one whose log-probs PPO uses.

    stop_at_eos=False is the seed's behaviour (it set eos_token_id=100_000): EOS may be sampled like any other
    token and generation goes on to the drawn length. An EOS id no token can have says "never stop"; leaving it
    None would not do, because generate() fills None from the model's own config and stops at EOS, and
    min_new_tokens would ban EOS (its logit set to −inf) — a different distribution from the policy's."""
    never = model.get_output_embeddings().weight.shape[0]  # one past the last token id
    return GenerationConfig(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                            eos_token_id=tokenizer.eos_token_id if stop_at_eos else never,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=None)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], lengths: list[int], *, stop_at_eos: bool,
             max_prompt_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Sample (top_k=0, top_p=1) up to max(lengths) tokens for a batch, with the adapter as it is now.

    Returns (input_ids, attention_mask, response_mask, prompt_length)."""
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"  # keep the end of a long prompt: that is where "Answer:" is
    enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_prompt_length,
                    add_special_tokens=True).to(device)
    gen_config = generation_config(model, tokenizer, max(lengths), stop_at_eos)
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         generation_config=gen_config)
    P = enc["input_ids"].shape[1]
    responses = out[:, P:]
    r_mask = response_mask(responses, lengths, tokenizer.eos_token_id, stop_at_eos)
    # Padding inside the response block must be a real token id for the forward pass; it is masked anyway.
    responses = torch.where(r_mask.bool(), responses, torch.full_like(responses, tokenizer.pad_token_id))
    input_ids = torch.cat([enc["input_ids"], responses], dim=1)
    attention_mask = torch.cat([enc["attention_mask"], r_mask], dim=1)
    return input_ids, attention_mask, r_mask, P


def decode_responses(tokenizer, input_ids: torch.Tensor, r_mask: torch.Tensor, prompt_length: int) -> list[str]:
    responses = input_ids[:, prompt_length:]
    return [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, r_mask)]
