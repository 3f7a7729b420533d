"""The one typed config of the pipeline.

A run is described by one TOML file (`configs/tiny.toml` by default, `configs/opt-1.3b.toml` for the seed's
recipe). Every field has a one-line doc; unknown keys, wrong types and impossible values are rejected with a
message that names the key. The flow receives the parsed dict through `metaflow.Config`; stages receive the
same dict as JSON and rebuild this object with `RunConfig.model_validate`.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf_lib.env import PROJECT_ROOT

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "tiny.toml"


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


class _Section(BaseModel):
    # strict: a string where a number belongs is an error, not a silent conversion.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class RunSection(_Section):
    name: str = Field("tiny", description="Profile name, shown in logs and W&B run names.")
    seed: int = Field(42, description="Seed for data sampling, model init and training.")
    storage_root: str = Field("artifacts", description="Where datasets, models and checkpoints go; relative to the repo root.")
    gpus: int = Field(0, ge=0, description="GPUs per GPU step (`@resources(gpu=...)`); 0 runs every stage on CPU.")
    wandb_mode: Literal["offline", "online", "disabled"] = Field("offline", description="W&B mode; online needs WANDB_API_KEY.")
    wandb_project: str = Field("rlhf-flow", description="W&B project name.")
    trust_remote_code: bool = Field(False, description="Allow hub models to run their own code (off unless you trust them).")
    min_free_disk_gb: float = Field(1.0, ge=0, description="Refuse to start with less free disk than this under storage_root.")


class DatasetSource(_Section):
    source: str = Field("sample", description="`sample`, a Deep Lake URI (hub://, al://, local dir), or a .jsonl/.parquet file.")
    eval_source: str = Field("", description="Held-out split source; empty carves `eval_rows` out of `source`.")
    max_rows: int = Field(0, ge=0, description="Rows to take from the source; 0 takes all.")
    eval_rows: int = Field(64, ge=1, description="Held-out rows (taken from eval_source, or carved from source).")


class DataSection(_Section):
    sft: DatasetSource = Field(default_factory=DatasetSource, description="SFT Q/A pairs (OpenOrca schema).")
    preference: DatasetSource = Field(default_factory=DatasetSource, description="Preference pairs (hh-rlhf schema).")
    prompts: DatasetSource = Field(default_factory=DatasetSource, description="RL prompts (Alpaca-OrcaChat schema).")
    sample_rows: int = Field(1200, ge=16, description="Rows generated per `sample` dataset before max_rows applies.")
    stream_batch_size: int = Field(256, ge=1, description="Rows per batch when stages stream a Deep Lake dataset.")


class TinyModelSpec(_Section):
    hidden_size: int = Field(64, ge=8, description="Width of the tiny model.")
    num_layers: int = Field(2, ge=1, description="Transformer layers.")
    num_heads: int = Field(4, ge=1, description="Attention heads; must divide hidden_size.")
    ffn_dim: int = Field(256, ge=8, description="Feed-forward width.")
    vocab_size: int = Field(1024, ge=300, description="Size of the locally trained tokenizer's vocabulary.")
    max_positions: int = Field(256, ge=32, description="Longest sequence the model accepts.")
    pretrain_steps: int = Field(300, ge=0, description="Causal-LM pretraining steps on sample text when a tiny policy is built; unused for reward models.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelSpec":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        return self


class ModelSection(_Section):
    model: str = Field("tiny", description="`tiny` (built from `tiny` below), a hub id, or a local directory.")
    tiny: TinyModelSpec = Field(default_factory=TinyModelSpec, description="Architecture of the `tiny` model.")


class LoraSection(_Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], description="Module names LoRA wraps.")


class SFTSection(_Section):
    quantize_4bit: bool = Field(True, description="Load the base in NF4 4-bit with double quantization (QLoRA).")
    lora: LoraSection = Field(default_factory=LoraSection, description="The SFT adapter.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("cosine", description="HF scheduler name.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    max_steps: int = Field(400, ge=1, description="Optimizer steps.")
    batch_size: int = Field(4, ge=1, description="Per-device batch size.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(1024, ge=16, description="Tokens per (packed) training sequence.")
    packing: bool = Field(True, description="Pack several examples into each sequence.")
    save_steps: int = Field(100, ge=1, description="Checkpoint every N steps.")
    logging_steps: int = Field(10, ge=1, description="Log every N steps.")
    eval_steps: int = Field(100, ge=1, description="Evaluate on the held-out split every N steps.")


class RewardSection(_Section):
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("linear", description="HF scheduler name.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Pairs per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_length: int = Field(512, ge=16, description="Tokens per chosen/rejected text (reward model's tokenizer).")
    save_steps: int = Field(200, ge=1, description="Checkpoint every N steps.")
    logging_steps: int = Field(20, ge=1, description="Log every N steps.")
    eval_steps: int = Field(200, ge=1, description="Evaluate on held-out pairs every N steps.")


class PPOSection(_Section):
    steps: int = Field(200, ge=1, description="PPO steps (one rollout batch each).")
    learning_rate: float = Field(1.41e-5, gt=0, description="Adam learning rate of the adapter and value head.")
    batch_size: int = Field(32, ge=1, description="Prompts per rollout (per process).")
    mini_batch_size: int = Field(4, ge=1, description="Rollouts per PPO optimizer step; must divide batch_size.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Mini-batches accumulated per optimizer step.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    init_kl_coef: float = Field(0.2, ge=0, description="Initial KL penalty coefficient beta.")
    adaptive_kl: bool = Field(True, description="Adapt beta toward kl_target (Ziegler et al.).")
    kl_target: float = Field(6.0, gt=0, description="Target KL per sequence (nats) of the adaptive controller.")
    kl_horizon: int = Field(10000, ge=1, description="Horizon of the adaptive KL controller.")
    target_kl: float = Field(0.1, gt=0, description="Early-stop threshold on mini-batch approx-KL (only with early_stopping).")
    early_stopping: bool = Field(False, description="Stop a step's PPO epochs once approx-KL exceeds 1.5 * target_kl.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip epsilon.")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip range.")
    vf_coef: float = Field(0.1, ge=0, description="Value loss weight.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    min_response_length: int = Field(32, ge=1, description="Shortest sampled response length (tokens).")
    max_response_length: int = Field(400, ge=1, description="Longest sampled response length (tokens).")
    stop_at_eos: bool = Field(False, description="End responses at EOS; the seed ignored EOS and generated to length.")
    max_prompt_length: int = Field(256, ge=8, description="Prompt tokens kept (left-truncated).")
    reward_max_length: int = Field(512, ge=16, description="Reward-model tokens for query + response.")
    lora: LoraSection = Field(default_factory=LoraSection, description="The fresh PPO adapter on the merged SFT model.")
    save_freq: int = Field(50, ge=1, description="Checkpoint every N steps.")
    keep_checkpoints: int = Field(3, ge=1, description="Most recent checkpoints kept.")


class EvalSection(_Section):
    num_prompts: int = Field(64, ge=1, description="Held-out prompts to generate for.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per answer.")
    num_samples_shown: int = Field(8, ge=0, description="Sample generations kept in the report.")


class RunConfig(_Section):
    run: RunSection = Field(default_factory=RunSection, description="Run-wide settings.")
    data: DataSection = Field(default_factory=DataSection, description="Dataset sources.")
    policy: ModelSection = Field(default_factory=ModelSection, description="The causal LM to align.")
    reward_model: ModelSection = Field(default_factory=ModelSection, description="The reward model (num_labels=1).")
    sft: SFTSection = Field(default_factory=SFTSection, description="QLoRA supervised fine-tuning.")
    reward: RewardSection = Field(default_factory=RewardSection, description="Reward-model training.")
    ppo: PPOSection = Field(default_factory=PPOSection, description="PPO against the reward model.")
    eval: EvalSection = Field(default_factory=EvalSection, description="Final evaluation.")

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        p = self.ppo
        if p.min_response_length > p.max_response_length:
            raise ValueError(
                f"ppo.min_response_length ({p.min_response_length}) > ppo.max_response_length "
                f"({p.max_response_length}); set min <= max"
            )
        if p.batch_size % p.mini_batch_size:
            raise ValueError(f"ppo.mini_batch_size ({p.mini_batch_size}) must divide ppo.batch_size ({p.batch_size})")
        return self

    @property
    def storage_root(self) -> Path:
        root = Path(self.run.storage_root).expanduser()
        return root if root.is_absolute() else PROJECT_ROOT / root

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=2)


def _where(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-after"))


def validate(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a parsed dict, turning pydantic's report into one line per bad key."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            key = _where(e["loc"]) or "(top level)"
            if e["type"] == "extra_forbidden":
                lines.append(f"unknown config key `{key}`: remove it or fix its spelling (see rlhf_lib/config.py)")
            else:
                msg = e["msg"].removeprefix("Value error, ")
                lines.append(f"config key `{key}`: {msg} (got {e.get('input')!r})")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def parse_toml(text: str) -> dict[str, Any]:
    """`metaflow.Config` parser: TOML text -> validated, fully defaulted dict."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config is not valid TOML: {err}") from None
    return validate(raw).model_dump()


def load(path: str | Path = DEFAULT_CONFIG) -> RunConfig:
    return validate(tomllib.loads(Path(path).read_text()))
