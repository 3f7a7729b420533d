"""What the flow's steps call: one function per step body, so flows/rlhf_flow.py only wires.

Stage outputs go to `<storage_root>/RLHFFlow/<run id>/<stage>/`; paths handed to Metaflow artifacts are
absolute, because `current.run_id` changes on `resume` while cloned artifacts must still point at the origin
run's files.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_lib import launch, tracking
from rlhf_lib.config import RunConfig, validate

FLOW_NAME = "RLHFFlow"


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


def run_stage(cfg: RunConfig, stage: str, run_id: str, inputs: dict[str, str], origin_run_id: str | None = None
              ) -> dict:
    """Launch a stage through accelerate and return its result.json. On a Metaflow `resume`, the stage is
    pointed at the origin run's checkpoints and continues from the newest valid one."""
    resume_from = origin_checkpoints(cfg, origin_run_id, stage)
    if resume_from:
        print(f"[{stage}] resuming: origin run {origin_run_id} left checkpoints in {resume_from}", flush=True)
    return launch.launch(stage, cfg.to_json(), stage_dir(cfg, run_id, stage), inputs, run_id=str(run_id),
                         resume_from=resume_from, env=tracking.wandb_env(cfg, stage, str(run_id)))
