"""What the machine a step lands on (its pod, on a cluster) must have before the step's stage writes anything: the
GPUs the step asked for, and the disk. Each check fails in seconds naming the key to change."""

from __future__ import annotations

import shutil
from pathlib import Path

from rlhf_lib import compute, launch, workspace
from rlhf_lib.config import RunConfig


def check_machine(cfg: RunConfig, stage: str, work: Path) -> int:
    """What this stage's own machine (its pod, on a cluster) must have before the stage writes anything: the GPUs
    its step asked for, and the disk. Returns the GPUs the stage gets (0: the CPU, with every GPU hidden from it).
    Fails in seconds naming the key, instead of training on the CPU for hours or dying on a full disk."""
    kind = compute.kind_when_running(stage)  # the step's GPUs and disk (rlhf_lib/compute.py)
    gpus = compute.step_gpus(cfg, kind)
    if gpus:
        visible = launch.visible_gpus()
        if visible < gpus:
            raise launch.MachineUnfit(
                f"[{stage}] run.gpus = {cfg.run.gpus} asks {gpus} GPU(s) for this stage, but this machine has "
                f"{visible} (CUDA_VISIBLE_DEVICES={launch.cuda_visible_devices()!r}): set run.gpus = 0 to run on the "
                f"CPU, or run where the GPUs are")
    check_disk(cfg, stage, kind, work)
    return gpus


def check_disk(cfg: RunConfig, stage: str, kind: str, work: Path) -> None:
    """run.min_free_disk_gb must be free where the stage writes. In a pod, what it may write is what its step asked
    for (resources.<kind>.disk_mb: Kubernetes evicts a pod past its ephemeral storage), whatever the node's
    filesystem shows free."""
    need_gb = cfg.run.min_free_disk_gb
    existing = next((p for p in [Path(work), *Path(work).parents] if p.exists()), Path("/"))
    free_gb = shutil.disk_usage(existing).free / 1e9
    asked_gb = getattr(cfg.resources, kind).disk_mb * 2**20 / 1e9
    if workspace.in_pod() and asked_gb < min(free_gb, need_gb):
        raise launch.MachineUnfit(
            f"[{stage}] this pod asked for {asked_gb:.1f} GB of disk (resources.{kind}.disk_mb = "
            f"{getattr(cfg.resources, kind).disk_mb}) and the stage needs {need_gb:.1f} GB (run.min_free_disk_gb): "
            f"raise resources.{kind}.disk_mb, which Kubernetes gets as @resources(disk=...)")
    if free_gb < need_gb:
        raise launch.MachineUnfit(
            f"[{stage}] only {free_gb:.1f} GB free under {existing} where this stage writes, it needs {need_gb:.1f} "
            f"(run.min_free_disk_gb): free space, or on a cluster raise the disk the step asks for "
            f"(resources.{kind}.disk_mb, which Kubernetes gets as @resources(disk=...))")
