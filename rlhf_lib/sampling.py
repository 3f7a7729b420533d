"""The one rollout sampler and the one response log-prob function: every stage that samples answers from a policy
(PPO's rollouts, ReST's Grow, RLAIF's pairs, the evaluation) samples through a `Sampler`, and every log-prob of a
response — PPO's old, new and reference log-probs, the evaluation's KL and perplexity — comes from
`response_logprobs`. GRPO and RLOO sample inside TRL's trainers (rlhf_lib/stages/trl_online.py).

`TransformersSampler` samples with transformers' `generate` from the model in this process. When the sampler is
the policy itself it keeps what generation already computed — each sampled token's log-prob, the entropy, the
value — so PPO needs no second forward pass of the policy over the rollout. An external engine (a vLLM server that
loads the LoRA adapter each iteration) is another `Sampler`: docs/DESIGN.md says how it plugs in.

Layout of a rollout batch (what the losses index into, and what `response_logprobs` reads):

    input_ids = [ left-padded prompt (P) | response (T), right-padded ]
    attention = [ 0 … 0 1 … 1            | 1 … 1 0 … 0                 ]

Position ids come from the attention mask (`rlhf_lib.rl.position_ids`), so left padding does not shift them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from rlhf_lib import precision, rl


@dataclass
class RolloutBatch:
    """One PPO step's rollouts on this process: what `trainer.ppo_step` consumes."""

    input_ids: torch.Tensor  # [B, P + T]
    attention_mask: torch.Tensor  # [B, P + T]
    response_mask: torch.Tensor  # [B, T]
    prompt_length: int  # P
    scores: torch.Tensor | None = None  # [B], the reward of each response
    # What the sampler computed, when it is the policy itself: the policy's log p(token) [B, T], the entropy of each
    # step's distribution [B, T] and the value of each state that emitted a token [B, T]. None: compute by forward.
    sampled: dict[str, torch.Tensor] | None = None


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
    """Pure sampling from the policy (top_k=0, top_p=1, temperature 1, no logits processor), so the rollout
    distribution is exactly the one whose log-probs PPO uses.

    stop_at_eos=False is the seed's behaviour (it set eos_token_id=100_000): EOS may be sampled like any other
    token and generation goes on to the drawn length. An EOS id no token can have says "never stop"; leaving it
    None would not do, because generate() fills None from the model's own config and stops at EOS, and
    min_new_tokens would ban EOS (its logit set to −inf) — a different distribution from the policy's."""
    never = model.get_output_embeddings().weight.shape[0]  # one past the last token id
    return GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=max_new_tokens,
                            eos_token_id=tokenizer.eos_token_id if stop_at_eos else never,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=None)


# Generation settings that reshape the logits before sampling (anything but these at their neutral value means
# the sampler is not the policy, and its log-probs are not the policy's).
_NEUTRAL = {"temperature": (None, 1.0), "top_k": (None, 0), "top_p": (None, 1.0), "min_p": (None, 0.0),
            "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0), "eta_cutoff": (None, 0.0),
            "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0),
            "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "suppress_tokens": (None,),
            "begin_suppress_tokens": (None,), "sequence_bias": (None,), "min_new_tokens": (None, 0),
            "min_length": (None, 0), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
            "guidance_scale": (None, 1.0), "renormalize_logits": (None, False)}


def samples_from_policy(config: GenerationConfig) -> bool:
    """True when sampling with `config` draws from the policy's own softmax: nothing reshapes the logits."""
    return bool(config.do_sample) and all(getattr(config, k, None) in ok for k, ok in _NEUTRAL.items())


class _RecordSampling(LogitsProcessor):
    """At every generation step: the entropy of the distribution the next token is drawn from, and (one step
    later, once it is known) the log-prob of the token that was drawn. Changes nothing; holds one [B, V] at a time."""

    def __init__(self):
        self.logprobs: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._last is not None:
            self.logprobs.append(self._last.gather(1, input_ids[:, -1:]).squeeze(1))
        logp = torch.log_softmax(scores.float(), dim=-1)
        self.entropy.append(-(logp.exp() * logp).sum(-1))
        self._last = logp
        return scores

    def finish(self, last_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.logprobs.append(self._last.gather(1, last_tokens.unsqueeze(1)).squeeze(1))
        self._last = None
        return torch.stack(self.logprobs, 1), torch.stack(self.entropy, 1)


@contextlib.contextmanager
def _neutral_generation_config(model):
    """generate() fills what a GenerationConfig leaves unset from the model's own generation config (a model may
    ship a temperature or a repetition penalty): give it a neutral one while we sample."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = base.generation_config
    base.generation_config = GenerationConfig()
    try:
        yield
    finally:
        base.generation_config = saved


class Sampler(Protocol):
    """What samples responses for a stage. `sample` returns a RolloutBatch (token ids, lengths as the response mask,
    the log-probs the sampler computed where it has them in `sampled`); `policy_changed` tells it the policy's weights
    moved — `adapter_dir` is where the new LoRA adapter was saved, None when only the in-process model changed (an
    engine in another process needs the directory; `TransformersSampler` samples from the live weights)."""

    tokenizer: object  # the policy's: decodes what `sample` returns

    def sample(self, prompts: list[str], lengths: list[int], *, stop_at_eos: bool,
               max_prompt_length: int | None = None, config: GenerationConfig | None = None) -> RolloutBatch: ...

    def policy_changed(self, adapter_dir: str | None = None) -> None: ...


class TransformersSampler:
    """Samples with transformers' `generate` from `policy` in this process: a PolicyWithValueHead (its log-probs,
    entropy and values are then taken from generation when the sampler is the policy itself) or a bare causal LM."""

    def __init__(self, policy, tokenizer):
        self.policy, self.tokenizer = policy, tokenizer

    def policy_changed(self, adapter_dir: str | None = None) -> None:
        """Nothing to do: `generate` runs on the weights the optimizer just changed."""

    @torch.no_grad()
    def sample(self, prompts: list[str], lengths: list[int], *, stop_at_eos: bool,
               max_prompt_length: int | None = None, config: GenerationConfig | None = None) -> RolloutBatch:
        """Sample up to max(lengths) tokens for a batch with the adapter as it is now (top_k=0, top_p=1 unless
        `config` says otherwise); prompts longer than max_prompt_length tokens keep their end. Forward passes run
        under the precision plan's autocast (bf16 under the bf16 plan)."""
        policy, tokenizer = self.policy, self.tokenizer
        lm = getattr(policy, "lm", policy)
        device = next(lm.parameters()).device
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = "left"  # keep the end of a long prompt: that is where "Answer:" is
        enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=max_prompt_length is not None,
                        max_length=max_prompt_length, add_special_tokens=True).to(device)
        config = config or generation_config(lm, tokenizer, max(lengths), stop_at_eos)
        record = hasattr(policy, "value") and samples_from_policy(config)
        recorder = _RecordSampling() if record else None
        with _neutral_generation_config(lm), precision.current().autocast_on(device), \
                (policy.capturing() if record else contextlib.nullcontext()) as hidden:
            out = lm.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                              generation_config=config,
                              logits_processor=LogitsProcessorList([recorder]) if record else None)
        P = enc["input_ids"].shape[1]
        responses = out[:, P:]
        r_mask = response_mask(responses, lengths, tokenizer.eos_token_id, stop_at_eos)
        sampled = None
        if record:
            logprobs, entropy = recorder.finish(responses[:, -1])
            # The states that emitted response token t: the prompt's last position, then each new token but the last.
            states = torch.cat([hidden[0][:, -1:]] + [h[:, -1:] for h in hidden[1:responses.shape[1]]], dim=1)
            sampled = {"logprobs": logprobs, "entropy": entropy, "values": policy.value(states)}
        # Padding inside the response block must be a real token id for the forward pass; it is masked anyway.
        responses = torch.where(r_mask.bool(), responses, torch.full_like(responses, tokenizer.pad_token_id))
        input_ids = torch.cat([enc["input_ids"], responses], dim=1)
        attention_mask = torch.cat([enc["attention_mask"], r_mask], dim=1)
        return RolloutBatch(input_ids, attention_mask, r_mask, P, sampled=sampled)


def sample_answers(sampler: Sampler, prompts: list[str], max_new_tokens: int, seed: int | None = None,
                   batch_size: int = 16) -> tuple[list[str], list[torch.Tensor]]:
    """Sampled answers (top_k=0, top_p=1, stop at EOS, prompts whole) and their token ids (EOS kept), `batch_size`
    prompts at a time. With a seed, the same policy and prompts give the same answers: evaluation compares policies
    on equal terms."""
    if seed is not None:
        torch.manual_seed(seed)
    texts, token_ids = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        batch = sampler.sample(chunk, [max_new_tokens] * len(chunk), stop_at_eos=True)
        token_ids += [r[m.bool()].cpu() for r, m in zip(batch.input_ids[:, batch.prompt_length:], batch.response_mask)]
        texts += decode_responses(sampler.tokenizer, batch)
    return texts, token_ids


def decode_responses(tokenizer, batch: RolloutBatch) -> list[str]:
    responses = batch.input_ids[:, batch.prompt_length:]
    return [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, batch.response_mask)]


def trim_left_padding(input_ids, attention_mask, P: int):
    """Drop the leading columns that are padding in every row (prompts are left-padded to the batch's longest):
    the same logits and values for every real token, less to compute for a mini-batch of shorter prompts."""
    first = int(attention_mask[:, :P].any(0).long().argmax()) if P else 0
    return input_ids[:, first:], attention_mask[:, first:], P - first


def response_logprobs(model, input_ids, attention_mask, response_start, with_entropy: bool = False):
    """log p(response token | prompt, earlier tokens) under `model`, [B, T]: the one function behind PPO's old, new
    and reference log-probs and the evaluation's KL and perplexity. Two layouts:

    - `response_start` an int P: the rollout layout (prompts left-padded to P columns, responses after them). Only
      the response positions go through the LM head (`logits_to_keep`); the values of the states that emitted the
      tokens come too when `model` is the policy with its value head.
    - `response_start` a tensor [B]: rows `prompt + answer` right-padded (every row starts at position 0), row i's
      answer at column response_start[i]; T is the longest answer's width (entries past an answer's end are
      padding's log-probs: mask them).

    Returns (log-probs, values or None, entropy of each step's distribution when asked, else None)."""
    if not isinstance(response_start, int):
        return _right_padded_logprobs(model, input_ids, attention_mask, response_start, with_entropy)
    input_ids, attention_mask, P = trim_left_padding(input_ids, attention_mask, response_start)
    T = input_ids.shape[1] - P
    values = None
    if hasattr(model, "v_head"):  # the policy with its value head: one forward gives both
        logits, values = model(input_ids, attention_mask, logits_to_keep=T + 1)
        values = values[:, P - 1:-1]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=T + 1,
                       position_ids=rl.position_ids(attention_mask)).logits
    logits = logits[:, :-1]  # positions P-1 .. P+T-2: the ones that emit response tokens 0 .. T-1
    logprobs = rl.logprobs_from_logits(logits, input_ids[:, P:])
    return logprobs, values, rl.entropy_from_logits(logits) if with_entropy else None


def _right_padded_logprobs(model, input_ids, attention_mask, starts: torch.Tensor, with_entropy: bool):
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=rl.position_ids(attention_mask)).logits[:, :-1]
    token_logprobs = rl.logprobs_from_logits(logits, input_ids[:, 1:])  # column c: log p(token c + 1)
    T = input_ids.shape[1] - int(starts.min())
    columns = (starts.to(logits.device).unsqueeze(1) - 1 + torch.arange(T, device=logits.device)).clamp(
        max=token_logprobs.shape[1] - 1)
    entropy = rl.entropy_from_logits(logits).gather(1, columns) if with_entropy else None
    return token_logprobs.gather(1, columns), None, entropy


@torch.no_grad()
def answer_logprobs(model, tokenizer, prompts: list[str], responses: list[torch.Tensor], batch_size: int = 16
                    ) -> list[torch.Tensor]:
    """`response_logprobs` of given answers (token ids) to prompts, `batch_size` at a time, one 1-D tensor per
    answer; each row `prompt + answer` right-padded."""
    device = next(model.parameters()).device
    prompt_ids = [tokenizer(p, return_tensors="pt")["input_ids"][0] for p in prompts]
    out = []
    for i in range(0, len(prompts), batch_size):
        answers = responses[i:i + batch_size]
        rows = [torch.cat([p, r.to(p.dtype)]) for p, r in zip(prompt_ids[i:i + batch_size], answers)]
        ids = torch.full((len(rows), max(len(r) for r in rows)), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, row in enumerate(rows):
            ids[j, :len(row)], mask[j, :len(row)] = row, 1
        starts = torch.tensor([len(p) for p in prompt_ids[i:i + batch_size]])
        with precision.current().autocast_on(device):
            logprobs, _, _ = response_logprobs(model, ids.to(device), mask.to(device), starts)
        out += [logprobs[j, :len(r)].cpu() for j, r in enumerate(answers)]
    return out
