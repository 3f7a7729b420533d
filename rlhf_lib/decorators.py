"""The flow's Metaflow decorators, applied from the run config so the flow file only wires.

- `StepCompute` (a FlowMutator): `@resources` and `@retry` on every step that runs a stage, as
  `rlhf_lib/compute.py` decides them from the config, and `@card` on each method's last step when its registry row
  says it has a card.
- `ShipProjectFiles` (a FlowMutator): Metaflow's code package holds the flow file and `rlhf_lib` (its
  METAFLOW_PACKAGE_POLICY); this adds the project files stages read at run time (`configs/`: the constitution, the
  profiles), at the same place relative to `rlhf_lib` as in the checkout.
"""

from __future__ import annotations

import os

from metaflow import FlowMutator, card, resources, retry
from metaflow.packaging_sys import ContentType

from rlhf_lib import compute, live, methods
from rlhf_lib.config import config_from_flow
from rlhf_lib.env import PROJECT_ROOT, runs_remote

SHIPPED_DIRS = ("configs",)


class StepCompute(FlowMutator):
    """Flow decorator: `@resources`, `@retry` and the methods' `@card`s, from the run config (see the module doc)."""

    def pre_mutate(self, mutable_flow) -> None:
        configs = dict(mutable_flow.configs)
        if configs.get("config") is None:
            return
        cfg = config_from_flow(configs["config"])
        times = compute.retries(cfg, runs_remote())
        carded, live_steps = {m.last_step for m in methods.REGISTRY.values() if m.card}, live.steps(cfg.run.methods)
        for name, step in mutable_flow.steps:  # a training step's card is live while it trains (rlhf_lib/live.py)
            if name in carded | live_steps:
                # Metaflow drops a refresh sooner than `refresh_interval` after the last: the card's own rate
                step.add_decorator(card, deco_kwargs=dict(type="blank", refresh_interval=cfg.run.card_refresh_s)
                                   if name in live_steps else dict(type="blank"))
            kind = compute.step_kind_this_run(cfg, name)
            if kind is None:
                continue
            step.add_decorator(resources, deco_kwargs=compute.step_resources(cfg, kind))
            if times:
                step.add_decorator(retry, deco_kwargs=dict(times=times,
                                                           minutes_between_retries=cfg.run.retry_wait_minutes))

    def mutate(self, mutable_flow) -> None:
        """On Kubernetes (`--with kubernetes`, Argo), each step's pods go where its kind's `[resources]` says:
        its node selector and tolerations (a GPU node pool's), unless the command line gave them; a gang step's
        JobSet declares the port its rank 0 listens on (`run.master_port`)."""
        configs = dict(mutable_flow.configs)
        if configs.get("config") is None:
            return
        cfg = config_from_flow(configs["config"])
        gang_steps = {m.gang_step for m in methods.REGISTRY.values() if m.gang}
        for name, step in mutable_flow.steps:
            kind = compute.step_kind_this_run(cfg, name)
            placement = compute.step_placement(cfg, kind) if kind else {}
            if name in gang_steps:  # the JobSet's MF_MASTER_PORT: without a port Metaflow writes the string "None"
                placement["port"] = cfg.run.master_port
            specs = step.get_decorator_specs("kubernetes")
            if not placement or not (specs or in_kubernetes_pod()):
                continue
            # Metaflow passes a pod none of the decorators a mutator inserted (it runs the mutator there again): in
            # the pod this @kubernetes is re-added here, or the step would run without it — a gang's nodes would
            # never learn of each other (its task_pre_step sets current.parallel) and each would train alone.
            attributes = dict(specs[0][3]) if specs else {}
            given = {k: v for k, v in placement.items() if not attributes.get(k)}
            if given:
                step.add_decorator("kubernetes", deco_kwargs={**attributes, **given}, duplicates=step.OVERRIDE)


def in_kubernetes_pod(environ=None) -> bool:
    """Whether this process is a task in a pod Metaflow's Kubernetes plugin (or Argo) started."""
    return bool((os.environ if environ is None else environ).get("METAFLOW_KUBERNETES_WORKLOAD"))


def shipped_files() -> list[tuple[str, str]]:
    """(local path, path in the package's code directory) of every project file a pod needs besides code."""
    return [(str(path), str(path.relative_to(PROJECT_ROOT)))
            for top in SHIPPED_DIRS for path in sorted((PROJECT_ROOT / top).rglob("*")) if path.is_file()]


class ShipProjectFiles(FlowMutator):
    """Flow decorator: add `configs/` to the code package, beside `rlhf_lib` (`PROJECT_ROOT` in a pod)."""

    def add_to_package(self):
        return [(path, arcname, ContentType.CODE_CONTENT) for path, arcname in shipped_files()]
