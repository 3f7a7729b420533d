"""W&B settings shared by every stage: one group per Metaflow run, one W&B run per stage.

Offline by default (files under `<storage_root>/wandb`, upload later with `wandb sync`), online only when the
config says so, disabled when asked. The key is never read here, stored, or passed as an argument: W&B reads
WANDB_API_KEY from the environment itself.
"""

from __future__ import annotations

import contextlib
import os

from rlhf_lib.config import RunConfig


def wandb_env(cfg: RunConfig, stage: str, run_id: str) -> dict[str, str]:
    """Environment for a stage subprocess; HF trainers and our PPO loop pick W&B settings up from it."""
    wandb_dir = cfg.local_root / "wandb"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    return {
        "WANDB_MODE": cfg.run.wandb_mode,
        "WANDB_DIR": str(wandb_dir),
        "WANDB_PROJECT": cfg.run.wandb_project,
        "WANDB_RUN_GROUP": f"RLHFFlow-{run_id}",
        "WANDB_NAME": f"{stage}-{run_id}",
        "WANDB_JOB_TYPE": stage,
        "WANDB_SILENT": "true",
        # HF's WandbCallback would otherwise upload every checkpoint as an artifact.
        "WANDB_LOG_MODEL": "false",
        # W&B's own debug logs, staging area and settings go beside its runs, not into ~/.cache/wandb,
        # ~/.local/share/wandb and ~/.config/wandb (unless you set these yourself).
        **{var: os.environ.get(var, str(wandb_dir / sub))
           for var, sub in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"), ("WANDB_CONFIG_DIR", "config"))},
    }


def run_name(stage: str) -> str:
    return os.environ.get("WANDB_NAME", f"{stage}-standalone")


def init_wandb(cfg: RunConfig, stage: str, config: dict | None = None):
    """A W&B run for a stage that logs by itself (our PPO loop), or None when W&B is disabled."""
    if cfg.run.wandb_mode == "disabled":
        return None
    import wandb

    wandb_dir = os.environ.get("WANDB_DIR", str(cfg.local_root / "wandb"))
    os.makedirs(wandb_dir, exist_ok=True)
    return wandb.init(
        mode=cfg.run.wandb_mode, project=os.environ.get("WANDB_PROJECT", cfg.run.wandb_project),
        group=os.environ.get("WANDB_RUN_GROUP"), name=run_name(stage), job_type=stage,
        dir=wandb_dir,
        config=config if config is not None else cfg.model_dump(),
    )


@contextlib.contextmanager
def wandb_run(cfg: RunConfig, stage: str, config: dict | None = None, enabled: bool = True):
    """The W&B lifecycle of a stage that logs by itself: a run for the block (None when W&B is disabled, or when
    `enabled` is False: another process of the stage logs), finished when the block ends, marked failed (exit code
    1) when it raises."""
    run = init_wandb(cfg, stage, config) if enabled else None
    try:
        yield run
    except BaseException:
        if run is not None:
            run.finish(exit_code=1)
        raise
    if run is not None:
        run.finish()
