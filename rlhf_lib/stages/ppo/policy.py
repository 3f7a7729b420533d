"""PPO's policy: a causal LM with its LoRA adapter and a scalar value head on its last hidden state, built on the
merged SFT model, and how its weights are saved (the adapter, and the value head as safetensors)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from rlhf_lib import rl

VALUE_HEAD_FILE = "value_head.safetensors"


class PolicyWithValueHead(nn.Module):
    """A causal LM (with its LoRA adapter) and a scalar value head on its last hidden state.

    The last hidden state is taken by a hook on the LM's decoder, so it is there both in a forward pass and during
    generation (where the rollout takes the values from it, with no second pass)."""

    def __init__(self, lm: nn.Module, hidden_size: int):
        super().__init__()
        self.lm = lm
        self.v_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)
        self._hidden: list[torch.Tensor] | None = None
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        base.get_decoder().register_forward_hook(self._keep_hidden)

    def _keep_hidden(self, module, args, output) -> None:
        if self._hidden is not None:
            self._hidden.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    @contextlib.contextmanager
    def capturing(self):
        """Within: every forward of the decoder appends its last hidden state to the yielded list."""
        self._hidden = []
        try:
            yield self._hidden
        finally:
            self._hidden = None

    def forward(self, input_ids, attention_mask, logits_to_keep: int = 0):
        """(logits of the last `logits_to_keep` positions, all of them when 0; the value of every position)."""
        with self.capturing() as hidden:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=rl.position_ids(attention_mask), logits_to_keep=logits_to_keep)
        return out.logits, self.value(hidden[-1])

    def value(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(s) from last hidden states [..., H], computed in the value head's own precision (fp32 under a bf16 LM)."""
        return self.v_head(hidden.to(self.v_head.weight.dtype)).squeeze(-1)


def setup_policy(cfg, sft_model: str, device):
    """The merged SFT model with a fresh LoRA adapter (`ppo.lora`) and a zero value head, in eval mode (no dropout),
    and its tokenizer (left padding)."""
    from rlhf_lib import models

    base, tokenizer = models.policy_on_device(sft_model, cfg.run.trust_remote_code, padding_side="left", device=device)
    lm = models.attach_lora(base, cfg.ppo.lora)
    hidden = getattr(base.config, "word_embed_proj_dim", None) or base.config.hidden_size
    policy = PolicyWithValueHead(lm, hidden).to(device)
    policy.eval()
    return policy, tokenizer


def trainable_parameters(policy: PolicyWithValueHead) -> list[nn.Parameter]:
    return [p for p in policy.parameters() if p.requires_grad]


def save_weights(policy: PolicyWithValueHead, directory: Path) -> None:
    """The adapter under DIR/adapter and the value head as DIR/value_head.safetensors."""
    from safetensors.torch import save_file

    policy.lm.save_pretrained(directory / "adapter", safe_serialization=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in policy.v_head.state_dict().items()},
              directory / VALUE_HEAD_FILE)
