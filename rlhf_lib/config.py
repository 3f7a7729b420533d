"""The one typed config of the pipeline.

A run is described by one TOML file (`configs/tiny.toml` by default, `configs/opt-1.3b.toml` for the seed's
recipe). Every field has a one-line doc; unknown keys, wrong types and impossible values are rejected with a
message that names the key. The flow receives the parsed dict through `metaflow.Config`; stages receive the
same dict as JSON and rebuild this object with `validate`. The method sections are derived from the method
registry (`rlhf_lib/methods.py`): each row's settings are the section of its name.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, create_model, model_validator

from rlhf_lib import methods as method_registry
from rlhf_lib import storage
from rlhf_lib.env import PROJECT_ROOT
from rlhf_lib.methods import PPOSection  # noqa: F401  (re-exported: tests and tools build one)
from rlhf_lib.settings import LoraSection, OnlineSection, OptimSection, Section, TrainerSection  # noqa: F401

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "tiny.toml"
DEFAULT_CONSTITUTION = PROJECT_ROOT / "configs" / "constitution.txt"
AI_FEEDBACK = "ai_feedback"


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


class RunSection(Section):
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
    master_port: int = Field(29500, ge=1024, le=65535, description="The port rank 0 of a gang (run.nodes >= 2) listens on for the other nodes: on Kubernetes and Argo the gang's JobSet declares it (`@kubernetes(port=...)`, its `MF_MASTER_PORT`); a local gang derives its own from the run id.")
    keep_failed_attempts: bool = Field(False, description="Keep the outputs of failed task attempts (their checkpoints and snapshots) when the run ends; by default `end` removes every attempt no artifact references.")
    card_refresh_s: float = Field(15.0, ge=1, description="Seconds between redraws of a training step's live card at first; later every sixth of the time the stage has trained (rlhf_lib/live.py). Each redraw writes the card's data from the step's own process (milliseconds).")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="The precision plan (rlhf_lib/precision.py): `bf16` keeps frozen weights in bf16, every trained parameter (full fine-tuning's master weights, LoRA adapters, the value head) in fp32, and runs forward passes under bf16 autocast — the GPU's plan, on any device (a CPU runs it through torch's CPU autocast, slower than fp32); `fp32` keeps everything in fp32; `auto` is `bf16` on a GPU with bf16, else `fp32`.")
    process_group_timeout_s: int = Field(1800, ge=1, description="Seconds a process of a multi-process stage waits for the others at a collective before the stage fails (torch.distributed's timeout).")

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


class DatasetSource(Section):
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


class DataSection(Section):
    sft: DatasetSource = Field(default_factory=DatasetSource, description="SFT Q/A pairs (OpenOrca schema).")
    preference: DatasetSource = Field(default_factory=DatasetSource, description="Preference pairs (hh-rlhf schema).")
    prompts: DatasetSource = Field(default_factory=DatasetSource, description="RL prompts (Alpaca-OrcaChat schema).")
    sample_rows: int = Field(1200, ge=16, description="Rows generated per `sample` dataset before max_rows applies.")
    prompt_format: Literal["qa", "plain"] = Field("qa", description="How questions become prompts: `qa`, the seed's `Question: …\\n\\nAnswer:` (SFT teaches it); `plain`, the text as it is, continued by the response (a story opening) — for a pretrained model used without the seed's template.")
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


class TinyModelSpec(Section):
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


class ModelSection(Section):
    model: str = Field("tiny", description="`tiny` (built from `tiny` below), a hub id, or a local directory.")
    tiny: TinyModelSpec = Field(default_factory=TinyModelSpec, description="Architecture of the `tiny` model.")


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


class RLAIFSection(Section):
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


class EvalSection(Section):
    num_prompts: int = Field(64, ge=1, description="Held-out prompts to generate for.")
    reward_max_length: int = Field(512, ge=16, description="Reward-model tokens for query + answer when scoring.")
    gold_judge: Literal["auto", "rule", "reward_model", "judge_model", "function"] = Field("auto", description="Independent judge: `rule` (the sample data's generating rule), `reward_model` (a second reward model on the other half of the pairs: the proxy then trains on the first half), `judge_model` (gold_judge_model under the constitution), `function` (gold_function); `auto` = rule on sample prompts, else reward_model.")
    gold_judge_model: str = Field("", description="Causal LM for gold_judge = `judge_model`.")
    gold_function: str = Field("", description="A Python `module:function` (prompts, completions -> floats) for gold_judge = `function`; one that takes `reference_model` gets the frozen SFT model's path (e.g. for a fluency term).")
    curve: bool = Field(True, description="Score every saved checkpoint of each online method (proxy, gold, KL from SFT): the over-optimisation curve, and the guard's recommended checkpoint.")
    kl_budget: float = Field(0.0, ge=0, description="KL from SFT (nats per sequence) a recommended checkpoint may reach: the guard recommends the best checkpoint by the gold judge within it; 0: no budget.")
    curve_prompts: int = Field(32, ge=1, description="Held-out prompts (the first of num_prompts) each checkpoint of the curve is scored on.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per answer.")
    num_samples_shown: int = Field(8, ge=0, description="Sample generations kept in the report.")


class StageResources(Section):
    cpu: int = Field(4, ge=1, description="CPU cores the step requests (`@resources(cpu=...)`).")
    memory_mb: int = Field(16384, ge=512, description="Memory (MB) the step requests.")
    shared_memory_mb: int = Field(2048, ge=1, description="Shared memory (MB) the step requests (/dev/shm: data loaders, NCCL).")
    disk_mb: int = Field(20480, ge=1024, description="Local disk (MB) the step requests (`@resources(disk=...)`, Kubernetes ephemeral storage); in a pod the stage checks it is at least run.min_free_disk_gb.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Kubernetes node labels the step's pods must match (its `@kubernetes(node_selector=...)`), e.g. a GPU node pool's `{\"cloud.google.com/gke-accelerator\" = \"nvidia-tesla-a100\"}`; one given on the command line (`--with kubernetes:node_selector=...`) wins.")
    tolerations: list[dict[str, str]] = Field(default_factory=list, description="Kubernetes tolerations of the step's pods (its `@kubernetes(tolerations=...)`), e.g. `[{key = \"nvidia.com/gpu\", operator = \"Exists\", effect = \"NoSchedule\"}]` for a GPU pool's taint; one given on the command line wins.")


class ResourcesSection(Section):
    """What each step asks of a cluster, by what the step does; GPUs follow from run.gpus (rlhf_lib/compute.py)."""

    train: StageResources = Field(default_factory=StageResources, description="sft, reward and every method in run.methods: run.gpus GPUs, one training process per GPU.")
    infer: StageResources = Field(default_factory=lambda: StageResources(cpu=4, memory_mb=16384, shared_memory_mb=1024, disk_mb=20480), description="merge, rlaif (with AI feedback) and evaluate: one process on one GPU (when run.gpus > 0).")
    light: StageResources = Field(default_factory=lambda: StageResources(cpu=2, memory_mb=8192, shared_memory_mb=512, disk_mb=10240), description="data, and the steps that have nothing to do (a method not in run.methods, rlaif without AI feedback): no GPU.")


class RunConfig(Section):
    """The run config. Its method sections (`ppo`, `dpo`, ...) come from the method registry: `schema()` is this
    class with one field per registered method, and `validate` builds one of those."""

    run: RunSection = Field(default_factory=RunSection, description="Run-wide settings.")
    resources: ResourcesSection = Field(default_factory=ResourcesSection, description="What each step asks of a cluster, per kind of step (GPUs: run.gpus).")
    data: DataSection = Field(default_factory=DataSection, description="Dataset sources.")
    policy: ModelSection = Field(default_factory=ModelSection, description="The causal LM to align.")
    reward_model: ModelSection = Field(default_factory=ModelSection, description="The reward model (num_labels=1).")
    sft: SFTSection = Field(default_factory=SFTSection, description="QLoRA supervised fine-tuning.")
    reward: RewardSection = Field(default_factory=RewardSection, description="Reward-model training.")
    rlaif: RLAIFSection = Field(default_factory=RLAIFSection, description="AI feedback: a judge model ranks pairs.")
    eval: EvalSection = Field(default_factory=EvalSection, description="Final evaluation.")

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.data.preference.source == AI_FEEDBACK and not self.rlaif.judge_model:
            raise ValueError("data.preference.source = \"ai_feedback\" needs rlaif.judge_model (a causal LM id or "
                             "path, or `tiny`)")
        if self.eval.gold_judge == "judge_model" and not self.eval.gold_judge_model:
            raise ValueError("eval.gold_judge = \"judge_model\" needs eval.gold_judge_model")
        if self.eval.gold_judge == "function" and not self.eval.gold_function:
            raise ValueError("eval.gold_judge = \"function\" needs eval.gold_function (a `module:function`)")
        return self

    @property
    def resolved_gold_judge(self) -> str:
        """The independent judge `evaluate` uses: `auto` resolved against the data sources."""
        if self.eval.gold_judge != "auto":
            return self.eval.gold_judge
        return "rule" if self.data.prompts.source == "sample" else "reward_model"

    @property
    def storage_uri(self) -> str:
        """run.storage_root as a URI: an s3:// URI as given, else an absolute local path (relative to the repo)."""
        return storage.absolute(self.run.storage_root, PROJECT_ROOT)

    @property
    def local_root(self) -> Path:
        """Where this machine keeps files: the storage root itself when it is local, else the scratch dir."""
        return storage.local_root(self.storage_uri)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(), indent=2)


_SCHEMAS: dict[tuple, type[RunConfig]] = {}


def schema() -> type[RunConfig]:
    """RunConfig with a section per registered method (`<name>`: the row's settings), built once per registry."""
    rows = tuple((m.name, m.settings, m.doc) for m in method_registry.REGISTRY.values() if m.settings)
    if rows not in _SCHEMAS:
        fields = {name: (settings, Field(default_factory=settings, description=doc)) for name, settings, doc in rows}
        _SCHEMAS[rows] = create_model("RunConfig", __base__=RunConfig, __module__=__name__, **fields)
    return _SCHEMAS[rows]


def _where(loc: tuple) -> str:
    return ".".join(str(part) for part in loc if not str(part).startswith("function-after"))


def validate(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from a parsed dict, turning pydantic's report into one line per bad key."""
    try:
        return schema().model_validate(raw)
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
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def _toml_key(key: str) -> str:
    """A bare key where TOML allows one, else a quoted key (`"cloud.google.com/gke-accelerator"`)."""
    return key if key and all(c.isalnum() or c in "_-" for c in key) else json.dumps(key)


def dump_toml(data: dict) -> str:
    """Enough TOML for configs: top-level tables whose values are scalars, lists or inline tables."""
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def config_from_flow(config_value, storage_root: str | None = None) -> RunConfig:
    """The typed config from the flow's `metaflow.Config` value (a read-only mapping), with run.storage_root set
    to the root `start` resolved (its `storage_root` artifact), so every step and stage uses the same one."""
    raw = config_value.to_dict() if hasattr(config_value, "to_dict") else dict(config_value)
    if storage_root is not None:
        raw = {**raw, "run": {**raw["run"], "storage_root": storage_root}}
    return validate(raw)


# ------------------------------------------------------------------ the reference (docs/configuration.md)

REFERENCE_BEGIN = "<!-- reference: written by `python -m rlhf_lib.config --reference`; do not edit by hand -->"
REFERENCE_END = "<!-- end of reference -->"


def reference_rows(model: type[Section] | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default as TOML, description) for every key of the run config, sections expanded in order."""
    rows = []
    for name, field in (model or schema()).model_fields.items():
        key = f"{prefix}{name}"
        default = field.get_default(call_default_factory=True)
        if isinstance(default, Section):
            rows.append((key, "(section)", field.description or ""))
            rows += reference_rows(type(default), key + ".")
        else:
            rows.append((key, "" if default is None else _toml_value(default), field.description or ""))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """The config reference as markdown: one table per top-level section."""
    out = [REFERENCE_BEGIN]
    for key, default, doc in reference_rows():
        if "." not in key:  # a top-level section: its own table
            out += ["", f"### `[{key}]`", "", doc, "", "| key | default | what |", "|---|---|---|"]
            continue
        shown = "—" if default == "(section)" else f"`{_cell(default)}`" if default else "(none)"
        out.append(f"| `{key}` | {shown} | {_cell(doc)} |")
    out += ["", REFERENCE_END]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--reference"]:
        sys.stdout.write(reference_markdown())
    else:
        sys.exit("usage: python -m rlhf_lib.config --reference   (the config reference, as in docs/configuration.md)")

