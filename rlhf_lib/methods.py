"""The alignment methods the flow branches into after `reward`: one row each, and the row says all a method is.

A row names the method's settings (a config section of the same name: `RunConfig.<name>` is derived from the
registry, rlhf_lib/config.py), its stage module (`rlhf_lib.stages.<stage>`: `python -m` runnable alone, writes
`result.json`), what it needs upstream (an online method — one that samples from the policy while it trains —
needs the reward), whether it keeps its adapter at each checkpoint (snapshots: its over-optimisation curve), whether it
runs as a multi-node gang, the extra artifacts it keeps, the plot of its training curves, whether it has a card of
its own, and its own `start` checks. Everything that loops over methods — the config, `start`'s checks, the steps'
resources, the pipeline, the evaluation, the report, the cards, the notebook and the tests — asks this table.

The flow's steps are written out (Metaflow reads the graph from the source); one per method, five lines:

    @step
    def grpo(self):
        \"\"\"GRPO: ...\"\"\"
        pipeline.method_step(self, "grpo", current)
        self.next(self.evaluate)

and `tests/test_registry.py` holds the flow's graph against this table. A gang method (`gang=True`) has the steps
`<name>` (routes: one node, or several), `<name>_train` (one node), `<name>_gang` → `<name>_gang_train`
(`@parallel`) → `<name>_gang_join`, and `<name>_join`, where the two routes meet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import Field, model_validator

from rlhf_lib.settings import LoraSection, OnlineSection, Section, TrainerSection

# What a method can ask of the upstream steps (the stage's `--input` names follow from these):
#   sft_model   the merged SFT model                  -> --input sft_model=DIR
#   reward      the proxy reward: the reward model, or reward.function when one is set
#                                                     -> --input reward_model=DIR | reward_function=module:fn
#   preference  the preference pairs (train and held-out) -> --input train=URI --input eval=URI
#   prompts     the RL training prompts               -> --input prompts=URI
NEEDS = ("sft_model", "reward", "preference", "prompts")


@dataclass(frozen=True)
class Method:
    """One alignment method."""

    name: str  # the flow step, the config section, the artifact prefix (`<name>_status`, ...), the report key
    title: str  # how reports name it
    settings: type[Section] | None  # its config section `<name>` (None: it has no settings)
    doc: str  # the config section's one-line description
    needs: tuple[str, ...]  # a subset of NEEDS
    snapshots: bool = False  # keeps its adapter at every checkpoint (DIR/snapshots): its over-optimisation curve
    gang: bool = False  # may run as one job across run.nodes machines (`@parallel`, see the module doc)
    stage: str = ""  # module under rlhf_lib.stages (default: the name), or a full dotted module path
    extras: tuple[str, ...] = ()  # result.json keys kept as `<name>_<key>` artifacts besides OUTCOME_KEYS
    plot: str = "rlhf_lib.report:plot_series"  # `module:function(method, run_data)` -> its training curves
    card: bool = False  # a card of its own (its training curves) on its last step
    check: Callable[[Any], list[str]] | None = None  # its own `start` checks of the whole config: problems
    plan: Callable[[Any], str] | None = None  # what `start` says it will do, from the whole config

    def __post_init__(self):
        unknown = [n for n in self.needs if n not in NEEDS]
        if unknown:
            raise ValueError(f"method {self.name!r} needs unknown input(s) {unknown}; choose from {list(NEEDS)}")

    @property
    def module(self) -> str:
        stage = self.stage or self.name
        return stage if "." in stage else f"rlhf_lib.stages.{stage}"

    @property
    def train_steps(self) -> tuple[str, ...]:
        """The flow steps that run the stage: the method's own step, or a gang's one-node and per-node steps."""
        return (f"{self.name}_train", f"{self.name}_gang_train") if self.gang else (self.name,)

    @property
    def gang_step(self) -> str | None:
        """The `@parallel` step of a gang method (its nodes rendezvous at a port, `run.master_port`); None else."""
        return f"{self.name}_gang_train" if self.gang else None

    @property
    def last_step(self) -> str:
        """The step that holds the method's outcome when its branch ends (and its card, if it has one)."""
        return f"{self.name}_join" if self.gang else self.name

    def problems(self, cfg) -> list[str]:
        return list(self.check(cfg)) if self.check else []


# What every method's step stores, as `<name>_<key>` artifacts (all of them, `None`/empty when skipped), read by
# evaluate, the report, the card and the notebook.
OUTCOME_KEYS = ("status", "model_path", "adapter_path", "checkpoint_dir", "snapshots_dir", "metrics", "stats",
                "seconds", "resumed_from_step", "config")
DONE, SKIPPED = "done", "skipped"

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the table (the built-in ones below; a test or an extension may add its own)."""
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    return REGISTRY[name]


def names() -> list[str]:
    return list(REGISTRY)


# ------------------------------------------------------------------ PPO


class PPOSection(Section):
    steps: int = Field(200, ge=1, description="PPO steps (one rollout batch each).")
    learning_rate: float = Field(1.41e-5, gt=0, description="Adam learning rate of the adapter and value head.")
    batch_size: int = Field(32, ge=1, description="Prompts per rollout step: the global batch, split evenly over the run.gpus x run.nodes processes.")
    mini_batch_size: int = Field(4, ge=1, description="Rollouts per PPO optimizer step, global like batch_size (each process works on its share); must divide batch_size.")
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

    @model_validator(mode="after")
    def _consistent(self) -> "PPOSection":
        if self.min_response_length > self.max_response_length:
            raise ValueError(f"ppo.min_response_length ({self.min_response_length}) > ppo.max_response_length "
                             f"({self.max_response_length}); set min <= max")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"ppo.mini_batch_size ({self.mini_batch_size}) must divide ppo.batch_size "
                             f"({self.batch_size})")
        return self


def ppo_batch_problem(batch_size: int, processes: int) -> str | None:
    """PPO's global batch must split evenly over its processes (each generates an equal share)."""
    if batch_size % processes:
        return (f"ppo.batch_size ({batch_size}) is the global batch: it must be divisible by the {processes} "
                f"processes run.gpus x run.nodes give (each generates an equal share)")
    return None


def _ppo_checks(cfg) -> list[str]:
    problem = ppo_batch_problem(cfg.ppo.batch_size, cfg.run.processes)
    return [problem] if problem else []


def _ppo_plan(cfg) -> str:
    p, processes = cfg.ppo, cfg.run.processes
    return (f"ppo: a global batch of {p.batch_size} prompts per step = {processes} process(es) x "
            f"{p.batch_size // processes}; optimizer steps of {p.mini_batch_size * p.gradient_accumulation_steps} "
            f"rollouts (mini-batch {p.mini_batch_size} x accumulation {p.gradient_accumulation_steps})")


register(Method("ppo", "PPO", PPOSection, "PPO against the reward model.", ("sft_model", "reward", "prompts"),
                snapshots=True, gang=True, extras=("value_head_path",),
                plot="rlhf_lib.report:plot_ppo", card=True, check=_ppo_checks, plan=_ppo_plan))


# ------------------------------------------------------------------ DPO


class DPOSection(TrainerSection):
    beta: float = Field(0.1, gt=0, description="DPO's beta: how strongly the policy is tied to the reference (the SFT model).")
    loss_type: str = Field("sigmoid", description="TRL DPO loss (`sigmoid` is the paper's).")
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    lora: LoraSection = Field(default_factory=LoraSection, description="The fresh DPO adapter on the merged SFT model.")


register(Method("dpo", "DPO", DPOSection, "DPO on the preference pairs.", ("sft_model", "preference")))


# ------------------------------------------------------------------ ReST


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


register(Method("rest", "ReST", RestSection, "ReST (Grow/Improve) against the reward model.",
                ("sft_model", "reward", "prompts"), snapshots=True, extras=("iterations", "grown_sets"),
                plot="rlhf_lib.report:plot_rest"))


# ------------------------------------------------------------------ GRPO and RLOO (TRL's online trainers)


class GRPOSection(OnlineSection):
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field("dapo", description="TRL GRPO loss: `grpo` (the paper's per-sequence mean), `dapo` (TRL's default: token-level), `dr_grpo`, `bnpo`.")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Divide each advantage by the std of its group's rewards (the paper), of the batch's, or not at all (Dr. GRPO).")


class RLOOSection(OnlineSection):
    beta: float = Field(0.05, ge=0, description="KL coefficient to the SFT model, subtracted from the reward (TRL RLOO's default).")
    normalize_advantages: bool = Field(False, description="Normalise the leave-one-out advantages over the batch.")


register(Method("grpo", "GRPO", GRPOSection, "GRPO (TRL GRPOTrainer) against the reward.",
                ("sft_model", "reward", "prompts"), snapshots=True))
register(Method("rloo", "RLOO", RLOOSection, "RLOO (TRL RLOOTrainer) against the reward.",
                ("sft_model", "reward", "prompts"), snapshots=True))


# ------------------------------------------------------------------ KTO


class KTOSection(TrainerSection):
    beta: float = Field(0.1, gt=0, description="KTO's beta: how strongly the policy is tied to the reference (the SFT model).")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field("kto", description="TRL KTO loss: `kto` (the paper's) or `apo_zero_unpaired`.")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of the desirable (chosen) answers' loss.")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of the undesirable (rejected) answers' loss.")
    batch_size: int = Field(8, ge=2, description="Answers per device per optimizer step; KTO's reference point (the KL to SFT) is estimated from mismatched answers within a batch, so at least 2.")
    learning_rate: float = Field(5e-6, gt=0, description="Peak learning rate.")
    max_steps: int = Field(200, ge=1, description="Optimizer steps.")
    lora: LoraSection = Field(default_factory=LoraSection, description="The fresh KTO adapter on the merged SFT model.")


register(Method("kto", "KTO", KTOSection, "KTO on the preference answers, each labelled desirable or undesirable.",
                ("sft_model", "preference"), snapshots=True))
