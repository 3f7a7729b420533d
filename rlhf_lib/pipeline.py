"""What the flow's steps call: one function per step body, so flows/rlhf_flow.py only wires.

Stage outputs go to `<storage_root>/RLHFFlow/<run id>/<stage>/`; paths handed to Metaflow artifacts are
absolute, because `current.run_id` changes on `resume` while cloned artifacts must still point at the origin
run's files.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_lib import launch, tracking
from rlhf_lib.config import AI_FEEDBACK, RunConfig, validate

FLOW_NAME = "RLHFFlow"
SKIPPED = "skipped"


def config_from_flow(config_value) -> RunConfig:
    """The typed config from the flow's `metaflow.Config` value (a read-only mapping)."""
    raw = config_value.to_dict() if hasattr(config_value, "to_dict") else dict(config_value)
    return validate(raw)


def stage_dir(cfg: RunConfig, run_id: str, stage: str) -> Path:
    return (cfg.storage_root / FLOW_NAME / str(run_id) / stage).resolve()


def origin_checkpoints(cfg: RunConfig, origin_run_id: str | None, stage: str) -> str | None:
    """On `resume`, the checkpoint directory of the same stage in the run being resumed (if it has one)."""
    if not origin_run_id:
        return None
    path = stage_dir(cfg, origin_run_id, stage) / "checkpoints"
    return str(path) if path.is_dir() else None


def run_stage(cfg: RunConfig, stage: str, run_id: str, inputs: dict[str, str], origin_run_id: str | None = None,
              *, name: str | None = None, extra_args: list[str] | None = None) -> dict:
    """Launch a stage through accelerate and return its result.json. On a Metaflow `resume`, the stage is
    pointed at the origin run's checkpoints and continues from the newest valid one. `name` (default: the
    stage) names the output directory, so one stage module can run twice in a step (the gold reward model).

    Stages on one machine take turns (a lock under storage_root): parallel branches of a local run would
    otherwise share its cores or GPUs and starve each other; on a cluster each step has its own machine."""
    name = name or stage
    resume_from = origin_checkpoints(cfg, origin_run_id, name)
    if resume_from:
        print(f"[{name}] resuming: origin run {origin_run_id} left checkpoints in {resume_from}", flush=True)
    with launch.machine_lock(cfg.storage_root, name):
        return launch.launch(stage, cfg.to_json(), stage_dir(cfg, run_id, name), inputs, run_id=str(run_id),
                             resume_from=resume_from, env=tracking.wandb_env(cfg, name, str(run_id)),
                             extra_args=extra_args)


def uses_ai_feedback(cfg: RunConfig) -> bool:
    return cfg.data.preference.source == AI_FEEDBACK


def judge_ref(ref: str, policy_base: str) -> str:
    """A judge model reference: `tiny` means the tiny policy base the data step built."""
    return policy_base if ref == "tiny" else ref


def reward_models(cfg: RunConfig, run_id: str, origin_run_id: str | None, inputs: dict[str, str]
                  ) -> tuple[dict, dict | None]:
    """The proxy reward model and, when the gold judge is a second reward model, that one too: trained on the
    other half of the pairs with another seed, so the methods never optimise what judges them."""
    if cfg.gold_judge != "reward_model":
        return run_stage(cfg, "reward", run_id, inputs, origin_run_id), None
    proxy = run_stage(cfg, "reward", run_id, inputs, origin_run_id, extra_args=["--part", "0/2"])
    gold_cfg = validate({**cfg.model_dump(), "run": {**cfg.run.model_dump(), "seed": cfg.run.seed + 1}})
    gold = run_stage(gold_cfg, "reward", run_id, inputs, origin_run_id, name="reward_gold",
                     extra_args=["--part", "1/2"])
    return proxy, gold


def method_enabled(cfg: RunConfig, method: str) -> bool:
    enabled = method in cfg.run.methods
    if not enabled:
        print(f"[{method}] {SKIPPED}: not in run.methods {cfg.run.methods}", flush=True)
    return enabled


def add_stage_seconds(report: dict, seconds: dict[str, float]) -> dict:
    """The report with each method's stage wall time (seconds inside the stage, not waiting for a turn)."""
    return {name: {**row, **({"stage_seconds": seconds[name]} if name in seconds else {})}
            for name, row in report.items()}
