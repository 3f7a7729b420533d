"""RL helpers shared by several stages (ppo, rest, rlaif, evaluate): token log-probs, position ids, sampling.

Kept out of `stages/ppo/` because ReST's Grow, RLAIF's pair sampling and the evaluation use the same pieces,
and two copies of "how we sample an answer" would drift apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf_lib import precision


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


@torch.no_grad()
def sample_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int | None = None,
                   batch_size: int = 16) -> tuple[list[str], list[torch.Tensor]]:
    """Sampled answers (top_k=0, top_p=1, stop at EOS) and their token ids (EOS kept, padding dropped).

    With a seed, the same model and prompts give the same answers: evaluation compares policies on equal terms."""
    from transformers import GenerationConfig

    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    config = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts, token_ids = [], []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
        with precision.current().autocast_on(device):  # bf16 forward passes under the bf16 plan
            out = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1]:]
        for row in out:
            keep = row[row != tokenizer.pad_token_id]
            eos = (keep == tokenizer.eos_token_id).nonzero()
            if len(eos):
                keep = keep[: eos[0, 0] + 1]
            token_ids.append(keep.cpu())
            texts.append(tokenizer.decode(keep, skip_special_tokens=True))
    return texts, token_ids


@torch.no_grad()
def response_logprobs(model, tokenizer, prompts: list[str], responses: list[torch.Tensor], batch_size: int = 16
                      ) -> list[torch.Tensor]:
    """log p(response token | prompt, earlier tokens) under `model`, one 1-D tensor per example; batched, each row
    `prompt + response` right-padded (so every row starts at position 0)."""
    device = next(model.parameters()).device
    prompt_ids = [tokenizer(p, return_tensors="pt")["input_ids"][0] for p in prompts]
    out = []
    for i in range(0, len(prompts), batch_size):
        rows = [torch.cat([p, r.to(p.dtype)]) for p, r in zip(prompt_ids[i:i + batch_size], responses[i:i + batch_size])]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        am = torch.zeros_like(ids)
        for j, row in enumerate(rows):
            ids[j, :len(row)], am[j, :len(row)] = row, 1
        ids, am = ids.to(device), am.to(device)
        with precision.current().autocast_on(device):
            logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids(am)).logits[:, :-1]
        logp = logprobs_from_logits(logits, ids[:, 1:])
        for j, (p, r) in enumerate(zip(prompt_ids[i:i + batch_size], responses[i:i + batch_size])):
            out.append(logp[j, len(p) - 1:len(p) - 1 + len(r)].cpu())
    return out
