"""The alignment methods the flow branches into after `reward`: one table, read by the flow, evaluate, the
report, the cards and the notebook.

A method is a stage module (`rlhf_lib.stages.<stage>`: `python -m` runnable alone, writes `result.json`), a config
section of the same name, a row here, and a flow step of the same name whose body is one call:

    @step
    def grpo(self):
        \"\"\"GRPO: ...\"\"\"
        pipeline.store_outcome(self, "grpo", pipeline.run_method(self, "grpo", current))
        self.next(self.evaluate)

Everything downstream (which inputs the stage gets, the GPUs its step asks for, the evaluation, the over-
optimisation curve, the report, the card, the notebook) loops over `REGISTRY`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    needs: tuple[str, ...]  # a subset of NEEDS
    online: bool  # samples from the policy while it trains: takes a reward function, has an over-optimisation curve
    gang: bool = False  # runs as one job across run.nodes machines (`@parallel`: <name> -> <name>_train -> <name>_join)
    stage: str = ""  # module under rlhf_lib.stages (default: the name), or a full dotted module path
    section: str | None = ""  # config section with its settings (default: the name; None: none)
    extras: tuple[str, ...] = ()  # result.json keys kept as `<name>_<key>` artifacts besides OUTCOME_KEYS

    def __post_init__(self):
        unknown = [n for n in self.needs if n not in NEEDS]
        if unknown:
            raise ValueError(f"method {self.name!r} needs unknown input(s) {unknown}; choose from {list(NEEDS)}")

    @property
    def module(self) -> str:
        stage = self.stage or self.name
        return stage if "." in stage else f"rlhf_lib.stages.{stage}"

    @property
    def config_section(self) -> str | None:
        return self.name if self.section == "" else self.section

    @property
    def train_step(self) -> str:
        """The flow step that runs the stage (the gang's per-node step for a gang)."""
        return f"{self.name}_train" if self.gang else self.name


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


def online() -> list[str]:
    return [m.name for m in REGISTRY.values() if m.online]


register(Method("ppo", "PPO", ("sft_model", "reward", "prompts"), online=True, gang=True,
                extras=("value_head_path",)))
register(Method("dpo", "DPO", ("sft_model", "preference"), online=False))
register(Method("rest", "ReST", ("sft_model", "reward", "prompts"), online=True, extras=("iterations", "grown_sets")))
register(Method("grpo", "GRPO", ("sft_model", "reward", "prompts"), online=True))
register(Method("rloo", "RLOO", ("sft_model", "reward", "prompts"), online=True))
