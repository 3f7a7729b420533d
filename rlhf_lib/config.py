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

from rlhf_lib import methods as method_registry
from rlhf_lib.env import PROJECT_ROOT

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "tiny.toml"
DEFAULT_CONSTITUTION = PROJECT_ROOT / "configs" / "constitution.txt"
AI_FEEDBACK = "ai_feedback"


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


class _Section(BaseModel):
    # strict: a string where a number belongs is an error, not a silent conversion.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class RunSection(_Section):
    name: str = Field("tiny", description="Profile name, shown in logs and W&B run names.")
    seed: int = Field(42, description="Seed for data sampling, model init and training.")
    storage_root: str = Field("artifacts", description="Where datasets, models and checkpoints go: a local path (relative to the repo root) or an s3:// URI; with Metaflow's S3 datastore a local value means `<METAFLOW_DATASTORE_SYSROOT_S3>/rlhf`.")
    gpus: int = Field(0, ge=0, description="GPUs per GPU step (`@resources(gpu=...)`); 0 runs every stage on CPU.")
    wandb_mode: Literal["offline", "online", "disabled"] = Field("offline", description="W&B mode; online needs WANDB_API_KEY.")
    wandb_project: str = Field("rlhf-flow", description="W&B project name.")
    trust_remote_code: bool = Field(False, description="Allow hub models to run their own code (off unless you trust them).")
    min_free_disk_gb: float = Field(1.0, ge=0, description="Refuse to start with less free disk than this under storage_root.")
    cpu_threads: int = Field(0, ge=0, description="torch intra-op threads per CPU stage; 0 = the cores free when the stage starts (rlhf_lib/cpu.py).")
    methods: list[str] = Field(default_factory=lambda: ["ppo"], description=f"Alignment methods to run after `reward`, any of {method_registry.names()} (rlhf_lib/methods.py); the others record `skipped`.")
    retries: int = Field(2, ge=0, le=3, description="`@retry` times for every compute step on remote compute (`--with kubernetes`/`batch`, Argo, Step Functions): a killed or preempted task is re-run in the same run and continues from its own newest checkpoint.")
    local_retries: int = Field(0, ge=0, le=3, description="`@retry` times when the steps run on this machine: 0 shows a failure at once instead of running the failing stage again.")
    retry_wait_minutes: int = Field(1, ge=0, description="Minutes Metaflow waits before a retry.")
    nodes: int = Field(1, ge=1, description="Machines the PPO stage spans (Metaflow `@parallel`, torch.distributed across them); 1 changes nothing.")

    @model_validator(mode="after")
    def _known_methods(self) -> "RunSection":
        known = method_registry.names()
        if not self.methods:
            raise ValueError(f"run.methods is empty; name at least one of {known}")
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise ValueError(f"run.methods names unknown method(s) {unknown}; choose from {known}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"run.methods lists a method twice: {self.methods}")
        return self

    @property
    def processes(self) -> int:
        """Processes a multi-process stage (PPO) runs as: one per GPU (one on the CPU) on each of run.nodes."""
        return max(self.gpus, 1) * self.nodes


class DatasetSource(_Section):
    source: str = Field("sample", description="`sample`, a Deep Lake URI (hub://, al://, local dir), a .jsonl/.parquet file, or (preference only) `ai_feedback`.")
    eval_source: str = Field("", description="Held-out split source; empty carves `eval_rows` out of `source`.")
    max_rows: int = Field(0, ge=0, description="Rows to take from the source; 0 takes all.")
    eval_rows: int = Field(0, ge=0, description="Held-out rows: from eval_source (0 = all of it), or carved from the start of source (0 = 64).")
    format: Literal["", "alpaca", "openorca", "hh"] = Field("", description="Shorthand column mapping for a common shape: `alpaca` (instruction/input/output), `openorca` (question/response), `hh` (chosen/rejected).")
    columns: dict[str, str | list[str]] = Field(default_factory=dict, description="This kind's column -> the source's column (a list is joined with newlines, empty parts skipped); overrides `format`.")

    @property
    def carved_eval_rows(self) -> int:
        """Rows held out from the start of `source` when there is no eval_source."""
        return self.eval_rows or DEFAULT_EVAL_ROWS


DEFAULT_EVAL_ROWS = 64


class DataSection(_Section):
    sft: DatasetSource = Field(default_factory=DatasetSource, description="SFT Q/A pairs (OpenOrca schema).")
    preference: DatasetSource = Field(default_factory=DatasetSource, description="Preference pairs (hh-rlhf schema).")
    prompts: DatasetSource = Field(default_factory=DatasetSource, description="RL prompts (Alpaca-OrcaChat schema).")
    sample_rows: int = Field(1200, ge=16, description="Rows generated per `sample` dataset before max_rows applies.")
    stream_batch_size: int = Field(256, ge=1, description="Rows per batch when stages stream a Deep Lake dataset.")

    @model_validator(mode="after")
    def _mappings_fit_their_kind(self) -> "DataSection":
        from rlhf_lib.data.lake import FORMATS, SCHEMAS

        for kind in SCHEMAS:
            section = getattr(self, kind)
            if section.format and kind not in FORMATS[section.format]:
                fits = [f for f, kinds in FORMATS.items() if kind in kinds]
                raise ValueError(f"data.{kind}.format = {section.format!r} does not describe {kind} data; use one "
                                 f"of {fits} or map columns with data.{kind}.columns")
            own = SCHEMAS[kind]["required"] + SCHEMAS[kind]["optional"]
            unknown = [c for c in section.columns if c not in own]
            if unknown:
                raise ValueError(f"data.{kind}.columns maps {unknown}, which {kind} data does not have; its "
                                 f"columns are {own}")
        return self


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


class OptimSection(_Section):
    """The optimizer and checkpoint fields every HF-Trainer stage takes (sft, reward, dpo, rest's Improve, grpo,
    rloo); subclasses change defaults or add fields."""

    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: str = Field("linear", description="HF scheduler name.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    max_steps: int = Field(400, ge=1, description="Optimizer steps.")
    batch_size: int = Field(8, ge=1, description="Per-device batch size (pairs for reward and dpo).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    save_steps: int = Field(100, ge=1, description="Checkpoint every N steps.")
    logging_steps: int = Field(10, ge=1, description="Log every N steps.")


class TrainerSection(OptimSection):
    """The HF-Trainer stages that train on a fixed dataset (sft, reward, dpo, rest's Improve)."""

    max_length: int = Field(512, ge=16, description="Tokens per training sequence (per text of a pair).")
    eval_steps: int = Field(100, ge=1, description="Evaluate on the held-out split every N steps.")


class SFTSection(TrainerSection):
    quantize_4bit: bool = Field(True, description="Load the base in NF4 4-bit with double quantization (QLoRA).")
    lora: LoraSection = Field(default_factory=LoraSection, description="The SFT adapter.")
    lr_scheduler: str = Field("cosine", description="HF scheduler name.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    batch_size: int = Field(4, ge=1, description="Per-device batch size.")
    max_length: int = Field(1024, ge=16, description="Tokens per (packed) training sequence.")
    packing: bool = Field(True, description="Pack several examples into each sequence.")


class RewardSection(TrainerSection):
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps.")
    save_steps: int = Field(200, ge=1, description="Checkpoint every N steps.")
    logging_steps: int = Field(20, ge=1, description="Log every N steps.")
    eval_steps: int = Field(200, ge=1, description="Evaluate on held-out pairs every N steps.")
    function: str = Field("", description="A Python reward `module:function` (prompts, completions -> one float each) that the online methods (ppo, grpo, rloo, rest) optimise instead of a trained reward model, e.g. `rlhf_lib.judges:rule_reward`; empty: train the reward model.")


class DPOSection(TrainerSection):
    beta: float = Field(0.1, gt=0, description="DPO's beta: how strongly the policy is tied to the reference (the SFT model).")
    loss_type: str = Field("sigmoid", description="TRL DPO loss (`sigmoid` is the paper's).")
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    lora: LoraSection = Field(default_factory=LoraSection, description="The fresh DPO adapter on the merged SFT model.")


class RestSection(TrainerSection):
    grow_steps: int = Field(2, ge=1, description="Grow iterations (sample a new dataset from the current policy).")
    prompts_per_grow: int = Field(128, ge=1, description="Training prompts sampled from at each Grow.")
    samples_per_prompt: int = Field(4, ge=1, description="Completions per prompt at each Grow.")
    max_new_tokens: int = Field(64, ge=1, description="Longest sampled completion (tokens; stops at EOS).")
    reward_max_length: int = Field(512, ge=16, description="Reward-model tokens for prompt + completion when a Grow is scored.")
    thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.7, 0.9], description="Improve filters, strictly increasing quantiles in [0, 1) of the first Grow's reward-model scores; one Improve per threshold.")
    max_steps: int = Field(50, ge=1, description="Optimizer steps of each Improve.")
    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate of each Improve.")
    lora: LoraSection = Field(default_factory=LoraSection, description="The ReST adapter on the merged SFT model (kept across Improves).")

    @model_validator(mode="after")
    def _increasing(self) -> "RestSection":
        t = self.thresholds
        if not t:
            raise ValueError("rest.thresholds is empty; give an increasing list such as [0.5, 0.7, 0.9]")
        if any(b <= a for a, b in zip(t, t[1:])):
            raise ValueError(f"rest.thresholds {t} must be strictly increasing (ReST raises the bar at each Improve)")
        if not all(0 <= x < 1 for x in t):
            raise ValueError(f"rest.thresholds {t} are quantiles of the Grow scores: each in [0, 1)")
        return self


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


class GRPOSection(OnlineSection):
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field("dapo", description="TRL GRPO loss: `grpo` (the paper's per-sequence mean), `dapo` (TRL's default: token-level), `dr_grpo`, `bnpo`.")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Divide each advantage by the std of its group's rewards (the paper), of the batch's, or not at all (Dr. GRPO).")


class RLOOSection(OnlineSection):
    beta: float = Field(0.05, ge=0, description="KL coefficient to the SFT model, subtracted from the reward (TRL RLOO's default).")
    normalize_advantages: bool = Field(False, description="Normalise the leave-one-out advantages over the batch.")


class RLAIFSection(_Section):
    judge_model: str = Field("", description="Causal LM that judges pairs when data.preference.source = `ai_feedback`: `tiny` (the built tiny policy base), a hub id or a local path.")
    constitution: str = Field(str(DEFAULT_CONSTITUTION.relative_to(PROJECT_ROOT)), description="Text file of principles the judge follows; relative to the repo root.")
    num_prompts: int = Field(256, ge=1, description="Training prompts to sample a pair of completions for.")
    max_new_tokens: int = Field(48, ge=1, description="Longest sampled completion (tokens; stops at EOS).")
    calibrate_position_bias: bool = Field(True, description="Subtract the judge's mean preference for the first-shown answer before comparing the two orders.")
    max_length: int = Field(512, ge=32, description="Judge prompt tokens kept (left-truncated).")

    @property
    def constitution_path(self) -> Path:
        path = Path(self.constitution).expanduser()
        return path if path.is_absolute() else PROJECT_ROOT / path


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
    reward_max_length: int = Field(512, ge=16, description="Reward-model tokens for query + answer when scoring.")
    gold_judge: Literal["auto", "rule", "reward_model", "judge_model", "function"] = Field("auto", description="Independent judge: `rule` (the sample data's generating rule), `reward_model` (a second reward model on the other half of the pairs: the proxy then trains on the first half), `judge_model` (gold_judge_model under the constitution), `function` (gold_function); `auto` = rule on sample prompts, else reward_model.")
    gold_judge_model: str = Field("", description="Causal LM for gold_judge = `judge_model`.")
    gold_function: str = Field("", description="A Python `module:function` (prompts, completions -> floats) for gold_judge = `function`.")
    curve: bool = Field(True, description="Score every saved checkpoint of each online method (proxy, gold, KL from SFT): the over-optimisation curve.")
    curve_prompts: int = Field(32, ge=1, description="Held-out prompts (the first of num_prompts) each checkpoint of the curve is scored on.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per answer.")
    num_samples_shown: int = Field(8, ge=0, description="Sample generations kept in the report.")


class StageResources(_Section):
    cpu: int = Field(4, ge=1, description="CPU cores the step requests (`@resources(cpu=...)`).")
    memory_mb: int = Field(16384, ge=512, description="Memory (MB) the step requests.")
    shared_memory_mb: int = Field(2048, ge=1, description="Shared memory (MB) the step requests (/dev/shm: data loaders, NCCL).")
    disk_mb: int = Field(20480, ge=1024, description="Local disk (MB) the step requests (`@resources(disk=...)`, Kubernetes ephemeral storage); the stage checks it has this much free before it writes.")


class ResourcesSection(_Section):
    """What each step asks of a cluster, by what the step does; GPUs follow from run.gpus (rlhf_lib/resources.py)."""

    train: StageResources = Field(default_factory=StageResources, description="sft, reward and every method in run.methods: run.gpus GPUs, one training process per GPU.")
    infer: StageResources = Field(default_factory=lambda: StageResources(cpu=4, memory_mb=16384, shared_memory_mb=1024, disk_mb=20480), description="merge, rlaif (with AI feedback) and evaluate: one process on one GPU (when run.gpus > 0).")
    light: StageResources = Field(default_factory=lambda: StageResources(cpu=2, memory_mb=8192, shared_memory_mb=512, disk_mb=10240), description="data, and the steps that have nothing to do (a method not in run.methods, rlaif without AI feedback): no GPU.")


class RunConfig(_Section):
    run: RunSection = Field(default_factory=RunSection, description="Run-wide settings.")
    resources: ResourcesSection = Field(default_factory=ResourcesSection, description="What each step asks of a cluster, per kind of step (GPUs: run.gpus).")
    data: DataSection = Field(default_factory=DataSection, description="Dataset sources.")
    policy: ModelSection = Field(default_factory=ModelSection, description="The causal LM to align.")
    reward_model: ModelSection = Field(default_factory=ModelSection, description="The reward model (num_labels=1).")
    sft: SFTSection = Field(default_factory=SFTSection, description="QLoRA supervised fine-tuning.")
    reward: RewardSection = Field(default_factory=RewardSection, description="Reward-model training.")
    ppo: PPOSection = Field(default_factory=PPOSection, description="PPO against the reward model.")
    dpo: DPOSection = Field(default_factory=DPOSection, description="DPO on the preference pairs.")
    rest: RestSection = Field(default_factory=RestSection, description="ReST (Grow/Improve) against the reward model.")
    grpo: GRPOSection = Field(default_factory=GRPOSection, description="GRPO (TRL GRPOTrainer) against the reward.")
    rloo: RLOOSection = Field(default_factory=RLOOSection, description="RLOO (TRL RLOOTrainer) against the reward.")
    rlaif: RLAIFSection = Field(default_factory=RLAIFSection, description="AI feedback: a judge model ranks pairs.")
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
        if self.data.preference.source == AI_FEEDBACK and not self.rlaif.judge_model:
            raise ValueError("data.preference.source = \"ai_feedback\" needs rlaif.judge_model (a causal LM id or "
                             "path, or `tiny`)")
        if self.eval.gold_judge == "judge_model" and not self.eval.gold_judge_model:
            raise ValueError("eval.gold_judge = \"judge_model\" needs eval.gold_judge_model")
        if self.eval.gold_judge == "function" and not self.eval.gold_function:
            raise ValueError("eval.gold_judge = \"function\" needs eval.gold_function (a `module:function`)")
        return self

    @property
    def gold_judge(self) -> str:
        """The independent judge `evaluate` uses: `auto` resolved against the data sources."""
        if self.eval.gold_judge != "auto":
            return self.eval.gold_judge
        return "rule" if self.data.prompts.source == "sample" else "reward_model"

    @property
    def storage_uri(self) -> str:
        """run.storage_root as a URI: an s3:// (or other scheme) URI as given, else an absolute local path."""
        from rlhf_lib import storage

        if storage.is_remote(self.run.storage_root):
            return self.run.storage_root.rstrip("/")
        root = Path(self.run.storage_root).expanduser()
        return str(root if root.is_absolute() else PROJECT_ROOT / root)

    @property
    def local_root(self) -> Path:
        """Where this machine keeps files: the storage root itself when it is local, else the scratch dir."""
        from rlhf_lib import storage

        return storage.scratch_root() if storage.is_remote(self.storage_uri) else Path(self.storage_uri)

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
                got = e.get("input")
                # A section-level check names its keys itself; echoing the whole section would bury them.
                lines.append(f"config key `{key}`: {msg}" + ("" if isinstance(got, dict) else f" (got {got!r})"))
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def parse_config(text: str) -> dict[str, Any]:
    """The flow's `metaflow.Config` parser: a bad config stops the CLI with the message alone, before any step
    runs (a MetaflowException, which Metaflow prints without a traceback)."""
    try:
        return parse_toml(text)
    except ConfigError as err:
        from metaflow.exception import MetaflowException

        raise MetaflowException(str(err)) from None


def parse_toml(text: str) -> dict[str, Any]:
    """`metaflow.Config` parser: TOML text -> validated, fully defaulted dict."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config is not valid TOML: {err}") from None
    return validate(raw).model_dump()


def load(path: str | Path = DEFAULT_CONFIG) -> RunConfig:
    return validate(tomllib.loads(Path(path).read_text()))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def dump_toml(data: dict) -> str:
    """Enough TOML for configs: top-level tables whose values are scalars, lists or inline tables."""
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
