"""Rewards: what the online methods (PPO, GRPO, RLOO, ReST) optimise and what the evaluation judges by.

A reward is either
- a reward model, scored through the reward model's *own* tokenizer: the policy and the reward model need not
  share one (OPT's BPE vs DeBERTa's SentencePiece in the seed), so the policy's tokens are decoded to text and
  re-tokenised here, truncated to the reward model's max length. Truncation drops tokens from the *left*: the
  answer being judged is at the end of the text, and a long prompt must not push it out (two hh-rlhf transcripts
  that differ only in their last turn would otherwise often score identically);
- or a Python function named `module:function`, texts in, floats out — `fn(prompts, completions, **kwargs)`
  returning one float per completion, the signature TRL's reward functions have — for verifiable rewards (a
  checker, a unit test, a rule). The sample data's rule `rlhf_lib.judges:rule_reward` is one.

Every stage scores through `Reward`, so PPO, GRPO, RLOO, ReST and the evaluation ask the same question of it.
"""

from __future__ import annotations

import importlib
import math

import torch

from rlhf_lib import precision
from rlhf_lib.data.formatting import reward_text
from rlhf_lib.stages.contract import FUNCTION_PREFIX



class RewardFunctionError(ValueError):
    """A `module:function` reward that cannot be used; the message names the problem."""


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
        with precision.current().autocast_on(device):
            scores.append(model(**batch).logits[:, 0].float())
    return torch.cat(scores) if scores else torch.zeros(0, device=device)


def load_function(spec: str):
    """The callable a `module:function` string names; raises RewardFunctionError saying what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise RewardFunctionError(f"{spec!r} is not `module:function` (e.g. rlhf_lib.judges:rule_reward)")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:
        raise RewardFunctionError(f"cannot import module {module_name!r}: {type(err).__name__}: {err}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise RewardFunctionError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise RewardFunctionError(f"{spec!r} is not callable")
    return fn


def _accepted(fn, context: dict) -> dict:
    """The keyword arguments of `context` that `fn` takes (all of them when it takes **kwargs)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(context)
    return {k: v for k, v in context.items() if k in params}


def call_function(fn, prompts: list[str], completions: list[str], spec: str = "", **context) -> list[float]:
    """fn(prompts=..., completions=..., and what it takes of `context`) checked: one finite float per
    completion."""
    out = fn(prompts=prompts, completions=completions, **_accepted(fn, context))
    try:
        values = [float(v) for v in out]
    except TypeError:
        raise RewardFunctionError(f"{spec or fn!r} returned {type(out).__name__}, not a list of floats") from None
    if len(values) != len(completions):
        raise RewardFunctionError(f"{spec or fn!r} returned {len(values)} values for {len(completions)} completions")
    if not all(math.isfinite(v) for v in values):
        raise RewardFunctionError(f"{spec or fn!r} returned a value that is not a finite number: {values}")
    return values


SAMPLE_PROMPT, SAMPLE_COMPLETION = "Question: What is two plus two?\n\nAnswer:", " Four. I hope this helps!"


def check_function(spec: str) -> str | None:
    """None when `spec` imports and scores one sample completion; else what went wrong (for `start`)."""
    try:
        call_function(load_function(spec), [SAMPLE_PROMPT], [SAMPLE_COMPLETION], spec)
    except RewardFunctionError as err:
        return str(err)
    except Exception as err:  # the function itself raised on a plain sample
        return f"{spec!r} raised on a sample completion: {type(err).__name__}: {err}"
    return None


class Reward:
    """A reward: `reward(prompts, completions)` -> one float32 score per completion, on `device`."""

    kind = ""

    def __init__(self, ref: str, device):
        self.ref, self.device = ref, torch.device(device)

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.kind} {self.ref}"


class ModelReward(Reward):
    """A reward model through its own tokenizer, scoring the decoded prompt + completion (left-truncated)."""

    kind = "reward model"

    def __init__(self, ref: str, max_length: int, trust_remote_code: bool = False, device=None, batch_size: int = 32):
        from rlhf_lib import models

        self.model, self.tokenizer = models.reward_model_on_device(ref, trust_remote_code, device)
        super().__init__(ref, next(self.model.parameters()).device)
        self.max_length, self.batch_size = max_length, batch_size

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        texts = [reward_text(p, c) for p, c in zip(prompts, completions)]
        return score_texts(self.model, self.tokenizer, texts, self.max_length, self.batch_size)

    def shares_tokenizer(self, tokenizer) -> bool:
        """Whether `tokenizer` (the policy's) is this reward model's own: then a rollout's token ids can be scored
        as they are, with no decode and re-tokenisation."""
        if not hasattr(self, "_vocab"):
            self._vocab = self.tokenizer.get_vocab()
        return (type(tokenizer) is type(self.tokenizer) and tokenizer.get_vocab() == self._vocab
                and tokenizer.pad_token_id == self.tokenizer.pad_token_id)

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores of token ids in this model's own vocabulary (left-padded prompt + right-padded response, as a
        rollout holds them), keeping the last `max_length` positions (left truncation, as for text)."""
        input_ids, attention_mask = input_ids[:, -self.max_length:], attention_mask[:, -self.max_length:]
        scores = []
        for i in range(0, len(input_ids), self.batch_size):
            am = attention_mask[i:i + self.batch_size].to(self.device)
            ids = input_ids[i:i + self.batch_size].to(self.device)
            # The classifier reads the last real token; padding must carry the pad id for it to find that token.
            ids = torch.where(am.bool(), ids, torch.full_like(ids, self.tokenizer.pad_token_id))
            scores.append(self.model(input_ids=ids, attention_mask=am).logits[:, 0].float())
        return torch.cat(scores)


class FunctionReward(Reward):
    """A Python function `module:function` (texts in, floats out). `context`: keyword arguments it gets when it
    takes them — as a gold judge, `reference_model`, the frozen starting model (the SFT model) every method
    began from."""

    kind = "reward function"

    def __init__(self, spec: str, device=None, context: dict | None = None):
        super().__init__(spec, device or "cpu")
        self.fn = load_function(spec)
        self.context = context or {}

    def __call__(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        values = call_function(self.fn, prompts, completions, self.ref, **self.context)
        return torch.tensor(values, dtype=torch.float32, device=self.device)


def load_reward(inputs: dict[str, str], max_length: int, trust_remote_code: bool = False, device=None) -> Reward:
    """The reward a stage's inputs name (`rlhf_lib.stages.contract.reward_input`), on this stage's device."""
    if "reward_function" in inputs:
        return FunctionReward(inputs["reward_function"].removeprefix(FUNCTION_PREFIX), device)
    if "reward_model" not in inputs:
        raise SystemExit("missing --input reward_model=DIR (or reward_function=function:module:fn)")
    return ModelReward(inputs["reward_model"], max_length, trust_remote_code, device)
