"""What each flow step asks of the machine that runs it — GPUs, CPUs, memory, shared memory, disk — and how often it
is retried, decided from the run config. Plain functions: the stages ask them at run time (a stage's GPUs, the
disk its pod asked for), and `rlhf_lib/decorators.py` applies them to the flow's steps.

GPUs go only where a stage uses them: `sft`, `reward` and every method in `run.methods` get `run.gpus` (one
training process per GPU); `merge`, `evaluate` and `rlaif` with AI feedback run one process on one GPU; `data`
gets none. CPU, memory, shared memory and disk come from `[resources]`, per kind of step (`train`, `infer`,
`light`). A step with nothing to do (a method not in `run.methods`, `rlaif` without AI feedback) and the steps that
only route ask for the least a scheduler takes (`IDLE`), whatever the config says.

Retries: `run.retries` when the steps run on remote compute (a pod that is preempted or evicted is retried and
continues from its checkpoint), `run.local_retries` (default 0) when they run on this machine, where a failure is
most often a bug that should show at once.
"""

from __future__ import annotations

from rlhf_lib import methods
from rlhf_lib.config import AI_FEEDBACK, RunConfig

TRAIN, INFER, LIGHT, IDLE = "train", "infer", "light", "idle"
# The flow's steps that run a stage of their own besides the methods' (start, the gangs' routing and end route).
CHAIN_STEPS = ("data", "sft", "merge", "reward", "rlaif", "evaluate")
# Stages that only run models (no gradient sync to spread): one process on one GPU, not one per GPU each doing
# the same work and writing the same files.
SINGLE_PROCESS_STAGES = frozenset({"merge", "rlaif", "evaluate"})
# What a step with nothing to do asks for: the least Metaflow's @resources takes (1 CPU, 512 MB of memory, and
# Kubernetes' smallest ephemeral-storage request Metaflow allows).
IDLE_RESOURCES = {"cpu": 1, "memory": 512, "shared_memory": None, "disk": 1024}


def step_kind_this_run(cfg: RunConfig, step: str) -> str | None:
    """`train`, `infer`, `light` for a step that runs a stage; `idle` for one with nothing to do this run (a method
    not in run.methods, rlaif without AI feedback); None for the steps that only route (start, a gang's routing
    and joins, end)."""
    if step == "rlaif" and cfg.data.preference.source != AI_FEEDBACK:
        return IDLE
    for method in methods.REGISTRY.values():
        if step in method.train_steps:
            return TRAIN if method.name in cfg.run.methods else IDLE
    return kind_when_running(step) if step in CHAIN_STEPS else None


def kind_when_running(stage: str) -> str:
    """The kind of step a stage runs in when it runs: `infer` for the stages that only run models
    (SINGLE_PROCESS_STAGES, one process on one GPU), `light` for data, `train` for the rest."""
    if stage == "data":
        return LIGHT
    return INFER if stage in SINGLE_PROCESS_STAGES else TRAIN


def step_gpus(cfg: RunConfig, kind: str) -> int:
    return {TRAIN: cfg.run.gpus, INFER: min(cfg.run.gpus, 1), LIGHT: 0, IDLE: 0}[kind]


def stage_gpus(stage: str, num_gpus: int) -> int:
    """GPUs a stage's processes use on this machine: at most one for the stages that only run models."""
    return min(num_gpus, 1) if stage in SINGLE_PROCESS_STAGES else num_gpus


def step_resources(cfg: RunConfig, kind: str) -> dict:
    """`@resources(...)` arguments of a step of this kind."""
    if kind == IDLE:
        return {"gpu": 0, **IDLE_RESOURCES}
    res = getattr(cfg.resources, kind)
    return {"gpu": step_gpus(cfg, kind), "cpu": res.cpu, "memory": res.memory_mb,
            "shared_memory": res.shared_memory_mb, "disk": res.disk_mb}


def step_placement(cfg: RunConfig, kind: str) -> dict:
    """`@kubernetes(...)` placement of a step of this kind: its node selector and tolerations, when configured."""
    if kind == IDLE:
        return {}
    res = getattr(cfg.resources, kind)
    return {k: v for k, v in (("node_selector", dict(res.node_selector)), ("tolerations", list(res.tolerations)))
            if v}


def retries(cfg: RunConfig, remote: bool) -> int:
    return cfg.run.retries if remote else cfg.run.local_retries
