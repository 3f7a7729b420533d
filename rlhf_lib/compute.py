"""What each flow step asks of the machine that runs it — GPUs, CPUs, memory, shared memory, disk — and how often it
is retried, decided from the run config and applied to the steps by `StepCompute` (a FlowMutator), so the flow
file only wires.

GPUs go only where a stage uses them: `sft`, `reward` and every method in `run.methods` get `run.gpus` (one
training process per GPU); `merge`, `evaluate` and `rlaif` with AI feedback run one process on one GPU; `data`,
a method not in `run.methods` and a skipped `rlaif` get none. CPU, memory, shared memory and disk come from
`[resources]`, per kind of step (`train`, `infer`, `light`).

Retries: `run.retries` when the steps run on remote compute (a pod that is preempted or evicted is retried and
continues from its checkpoint), `run.local_retries` (default 0) when they run on this machine, where a failure is
most often a bug that should show at once.
"""

from __future__ import annotations

import os
import sys

from metaflow import FlowMutator, resources, retry

from rlhf_lib import launch, methods
from rlhf_lib.config import AI_FEEDBACK, RunConfig

TRAIN, INFER, LIGHT = "train", "infer", "light"
# The flow's steps that run a stage of their own besides the methods' (start, the gangs' fan-out/join and end route).
CHAIN_STEPS = ("data", "sft", "merge", "reward", "rlaif", "evaluate")
# Decorators (`--with X`) and commands that put the steps on another machine.
REMOTE_DECORATORS = ("kubernetes", "batch")
REMOTE_COMMANDS = ("argo-workflows", "step-functions", "airflow", "kubernetes", "batch")


def step_kind(cfg: RunConfig, step: str) -> str | None:
    """`train`, `infer` or `light` for a step that runs a stage; None for the steps that only route (start, a
    gang's fan-out and join, end)."""
    if step == "rlaif" and cfg.data.preference.source != AI_FEEDBACK:
        return LIGHT
    for method in methods.REGISTRY.values():
        if step == method.train_step:
            return TRAIN if method.name in cfg.run.methods else LIGHT
    return stage_kind(step) if step in CHAIN_STEPS else None


def stage_kind(stage: str) -> str:
    """The kind of step a stage runs in when it runs: `infer` for the stages that only run models
    (`launch.SINGLE_PROCESS_STAGES`, one process on one GPU), `light` for data, `train` for the rest."""
    if stage == "data":
        return LIGHT
    return INFER if stage in launch.SINGLE_PROCESS_STAGES else TRAIN


def step_gpus(cfg: RunConfig, kind: str) -> int:
    return {TRAIN: cfg.run.gpus, INFER: min(cfg.run.gpus, 1), LIGHT: 0}[kind]


def runs_remote(argv: list[str] | None = None, environ: dict | None = None) -> bool:
    """Whether this command puts steps on remote compute: `--with kubernetes`/`--with batch` (on the command line
    or in METAFLOW_DECOSPECS), or a command that compiles for an orchestrator or runs inside a pod."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    decospecs = [a for i, a in enumerate(argv) if i and argv[i - 1] == "--with"]
    decospecs += [a.split("=", 1)[1] for a in argv if a.startswith("--with=")]
    decospecs += environ.get("METAFLOW_DECOSPECS", "").split()
    if any(spec.split(":")[0] in REMOTE_DECORATORS for spec in decospecs):
        return True
    return any(a in REMOTE_COMMANDS for a in argv[1:])


def retries(cfg: RunConfig, remote: bool) -> int:
    return cfg.run.retries if remote else cfg.run.local_retries


class StepCompute(FlowMutator):
    """Flow decorator: `@resources` and `@retry` on every stage step, from the run config (see the module doc)."""

    def pre_mutate(self, mutable_flow) -> None:
        from rlhf_lib.pipeline import config_from_flow

        configs = dict(mutable_flow.configs)
        if configs.get("config") is None:
            return
        cfg = config_from_flow(configs["config"])
        times = retries(cfg, runs_remote())
        for name, step in mutable_flow.steps:
            kind = step_kind(cfg, name)
            if kind is None:
                continue
            res = getattr(cfg.resources, kind)
            step.add_decorator(resources, deco_kwargs=dict(
                gpu=step_gpus(cfg, kind), cpu=res.cpu, memory=res.memory_mb, shared_memory=res.shared_memory_mb,
                disk=res.disk_mb))
            if times:
                step.add_decorator(retry, deco_kwargs=dict(times=times,
                                                           minutes_between_retries=cfg.run.retry_wait_minutes))
