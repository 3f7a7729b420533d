"""The building blocks of the run config's sections: strict pydantic models with a one-line doc per field.

The method registry (`rlhf_lib/methods.py`) and the config (`rlhf_lib/config.py`) both build on these, so a
method's settings can sit beside its registry row while `config.py` derives the run config from the registry.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """A config section: unknown keys and wrong types are errors, not silent conversions."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class LoraSection(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], description="Module names LoRA wraps.")


class OptimSection(Section):
    """The optimizer and checkpoint fields every HF-Trainer stage takes (sft, reward, dpo, rest's Improve, grpo,
    rloo); subclasses change defaults or add fields."""

    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("linear", description="HF scheduler name.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    max_steps: int = Field(400, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Per-device batch size: the examples the stage trains on (texts, pairs, or samples).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    save_steps: int = Field(100, ge=1, description="Checkpoint every N steps.")
    logging_steps: int = Field(10, ge=1, description="Log every N steps.")


class TrainerSection(OptimSection):
    """The HF-Trainer stages that train on a fixed dataset (sft, reward, the preference methods, rest's Improve)."""

    max_length: int = Field(512, ge=16, description="Tokens per training sequence (per text of a pair).")
    eval_steps: int = Field(100, ge=1, description="Evaluate on the held-out split every N steps.")


class OnlineSection(OptimSection):
    """TRL's online trainers (GRPO, RLOO): completions sampled from the policy in groups, scored by the reward."""

    num_generations: int = Field(4, ge=2, description="Completions sampled per prompt (the group the baseline is computed over).")
    batch_size: int = Field(16, ge=2, description="Completions per device per optimizer step; a multiple of num_generations.")
    max_completion_length: int = Field(64, ge=1, description="Longest sampled completion (tokens; stops at EOS).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (1 samples from the policy itself).")
    beta: float = Field(0.04, ge=0, description="KL coefficient to the SFT model (the adapter switched off); 0 drops the KL term and its reference forward.")
    epsilon: float = Field(0.2, gt=0, description="Clip range of the importance ratio.")
    num_iterations: int = Field(1, ge=1, description="Optimizer passes over each generated batch (mu).")
    reward_max_length: int = Field(512, ge=16, description="Reward-model tokens for prompt + completion.")
    lora: LoraSection = Field(default_factory=LoraSection, description="The fresh adapter on the merged SFT model.")

    @model_validator(mode="after")
    def _groups_fit(self) -> "OnlineSection":
        if self.batch_size % self.num_generations:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of num_generations "
                             f"({self.num_generations}): each step trains on whole groups of completions")
        return self
