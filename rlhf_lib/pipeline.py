"""What the flow's steps call: one function per step body, so flows/rlhf_flow.py only wires.

Stage outputs go to `<storage root>/RLHFFlow/<run id>/<stage>/attempt-<k>/`, a local directory or an S3 prefix,
one per attempt of the task (rlhf_lib/workspace.py). Artifacts hold absolute paths or URIs, because
`current.run_id` changes on `resume` while cloned artifacts must still point at the origin run's files. With an S3
root a stage runs in a local scratch directory on whatever machine runs the step: its inputs are downloaded first,
its checkpoints uploaded as they are written, everything else after it succeeds, `result.json` last; the artifacts
then name the S3 URIs.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from rlhf_lib import compute, launch, methods, storage, tracking
from rlhf_lib.config import AI_FEEDBACK, RunConfig, validate
from rlhf_lib.launch import Nodes
from rlhf_lib.methods import DONE, OUTCOME_KEYS, SKIPPED
from rlhf_lib.workspace import FLOW_NAME, OriginUnreachable, Workspace, stage_uri  # noqa: F401 (re-exported)

S3_DATASTORE_SUBDIR = "rlhf"  # stage outputs under the Metaflow S3 datastore's root, beside its own files


def config_from_flow(config_value, storage_root: str | None = None) -> RunConfig:
    """The typed config from the flow's `metaflow.Config` value (a read-only mapping), with run.storage_root set
    to the root `start` resolved (its `storage_root` artifact), so every step and stage uses the same one."""
    raw = config_value.to_dict() if hasattr(config_value, "to_dict") else dict(config_value)
    if storage_root is not None:
        raw = {**raw, "run": {**raw["run"], "storage_root": storage_root}}
    return validate(raw)


def judge_costs(cfg: RunConfig) -> list[str]:
    """What the proxy reward and the gold judge cost the run, in words (`start` prints it, the report carries it).
    A gold reward model is trained on half of the preference pairs, so the proxy gets only the other half."""
    from rlhf_lib.data import lake

    if cfg.reward.function:
        proxy = f"proxy reward: the function {cfg.reward.function} (no reward model is trained)"
    else:
        pref = cfg.data.preference
        n = None if pref.source == AI_FEEDBACK else lake.train_rows(pref, cfg.data.sample_rows)
        pairs = "the judged pairs" if pref.source == AI_FEEDBACK else (f"{n} pairs" if n is not None else "the pairs")
        if cfg.gold_judge == "reward_model":
            half = f"{(n + 1) // 2} of {n} pairs" if n is not None else "half of the pairs"
            proxy = (f"proxy reward model: {half} (the even-numbered); the other half trains the gold reward model "
                     f"(eval.gold_judge = \"reward_model\"). For all of them in the proxy, choose eval.gold_judge "
                     f"= \"rule\" / \"function\" (a rule you can compute) or \"judge_model\" (an LM judge)")
        else:
            proxy = f"proxy reward model: all {pairs}"
    gold = {"rule": "gold judge: the sample data's rule (rlhf_lib/judges.py), computed from the text; no training",
            "reward_model": "gold judge: a second reward model on the other half of the pairs, another seed",
            "judge_model": f"gold judge: {cfg.eval.gold_judge_model} under the constitution, both answer orders",
            "function": f"gold judge: the function {cfg.eval.gold_function}"}[cfg.gold_judge]
    return [proxy, gold]


class RunCannotStart(Exception):
    """`start` found problems the project diagnosed; Metaflow shows the message alone (see `start`)."""


def start(config_value, datastore_type: str | None) -> dict:
    """The `start` step: resolve where outputs go, check everything that could fail an hour in, say what the run
    will do. Returns the artifacts to store. A problem found here stops the run with the diagnosis alone, not a
    traceback through Metaflow."""
    from metaflow.exception import MetaflowException

    from rlhf_lib import env, preflight

    class CannotStart(MetaflowException, RunCannotStart):
        headline = "The run cannot start"

    cfg = config_from_flow(config_value)
    try:
        storage_root = resolve_storage_root(cfg, datastore_type)
        cfg = config_from_flow(config_value, storage_root)
        source = env.metaflow_config_source()
        print(f"[start] Metaflow config: {source}; datastore: {datastore_type}")
        print(f"[start] stage outputs and checkpoints: {storage_root}")
        preflight.check_or_raise(cfg)
    except preflight.PreflightError as err:
        raise CannotStart("\n".join(err.problems)) from None
    except storage.StorageError as err:
        raise CannotStart(str(err)) from None
    gpus = launch.visible_gpus()
    print(f"[start] profile {cfg.run.name}; methods {cfg.run.methods}; GPUs visible: {gpus}, run.gpus = {cfg.run.gpus}")
    for line in judge_costs(cfg):
        print(f"[start] {line}")
    if "ppo" in cfg.run.methods:
        p, processes = cfg.ppo, cfg.run.processes
        print(f"[start] ppo: a global batch of {p.batch_size} prompts per step = {processes} process(es) x "
              f"{p.batch_size // processes}; optimizer steps of {p.mini_batch_size * p.gradient_accumulation_steps} "
              f"rollouts (mini-batch {p.mini_batch_size} x accumulation {p.gradient_accumulation_steps})")
    return {"datastore_type": datastore_type, "storage_root": storage_root, "metaflow_config": source,
            "run_config": cfg.model_dump(), "gpus_visible": gpus, "judges": judge_costs(cfg)}


def resolve_storage_root(cfg: RunConfig, datastore_type: str | None) -> str:
    """Where this run's stage outputs go: run.storage_root when it is a URI; the Metaflow S3 datastore's root
    (`<sysroot>/rlhf`) when the run's datastore is S3 (on a cluster a local path would vanish with each pod);
    else the local path."""
    if storage.is_remote(cfg.run.storage_root) or datastore_type != "s3":
        return cfg.storage_uri
    from metaflow.metaflow_config import DATASTORE_SYSROOT_S3

    if not DATASTORE_SYSROOT_S3:
        raise storage.StorageError("Metaflow's datastore is S3 but METAFLOW_DATASTORE_SYSROOT_S3 is not set; set "
                                   "it, or set run.storage_root to an s3:// URI")
    return storage.join(DATASTORE_SYSROOT_S3, S3_DATASTORE_SUBDIR)


def check_machine(cfg: RunConfig, stage: str, work: Path) -> int:
    """What this stage's own machine (its pod, on a cluster) must have before the stage writes anything: the GPUs
    its step asked for, and the disk. Returns the GPUs the stage gets (0: the CPU, with every GPU hidden from it).
    Fails in seconds naming the key, instead of training on the CPU for hours or dying on a full disk."""
    kind = compute.stage_kind(stage)  # the step's GPUs and disk (rlhf_lib/compute.py)
    gpus = compute.step_gpus(cfg, kind)
    if gpus:
        visible = launch.visible_gpus()
        if visible < gpus:
            raise launch.MachineUnfit(
                f"[{stage}] run.gpus = {cfg.run.gpus} asks {gpus} GPU(s) for this stage, but this machine has "
                f"{visible} (CUDA_VISIBLE_DEVICES={launch.cuda_visible_devices()!r}): set run.gpus = 0 to run on the "
                f"CPU, or run where the GPUs are")
    need_gb = cfg.run.min_free_disk_gb
    if storage.is_remote(cfg.storage_uri):  # a pod: it asked the cluster for resources.<kind>.disk_mb of disk
        need_gb = max(need_gb, getattr(cfg.resources, kind).disk_mb / 1024 * 0.9)
    existing = next((p for p in [Path(work), *Path(work).parents] if p.exists()), Path("/"))
    free_gb = shutil.disk_usage(existing).free / 1e9
    if free_gb < need_gb:
        raise launch.MachineUnfit(
            f"[{stage}] only {free_gb:.1f} GB free under {existing} where this stage writes, it needs {need_gb:.1f} "
            f"(run.min_free_disk_gb; resources.{kind}.disk_mb on a cluster): free space, or raise the disk the step "
            f"asks for (resources.{kind}.disk_mb, which Kubernetes gets as @resources(disk=...))")
    return gpus


def run_stage(cfg: RunConfig, stage: str, run_id: str, inputs: dict[str, str], origin_run_id: str | None = None,
              *, name: str | None = None, extra_args: list[str] | None = None, nodes: Nodes | None = None,
              module: str | None = None, attempt: int = 0) -> dict | None:
    """Launch a stage through accelerate and return its result.json. `attempt` is Metaflow's retry count: each
    attempt works under its own prefix, and continues from the newest checkpoint that loads among its task's
    earlier attempts and, on a Metaflow `resume`, the origin run's. `name` (default: the stage) names the output
    directory, so one stage module can run twice in a step (the gold reward model). `nodes`: this machine's place
    in a multi-machine stage (`@parallel`); node 0 writes, stores and returns the result, the others return None.

    Stages on one machine take turns (a lock in a local directory): parallel branches of a local run would
    otherwise share its cores or GPUs and starve each other; on a cluster each step has its own machine. The
    nodes of one gang never wait for each other's turn: they must all run at once."""
    name = name or stage
    nodes = nodes or Nodes()
    ws = Workspace.of(cfg, run_id, name, attempt, nodes.index)
    gpus = check_machine(cfg, name, ws.work)
    try:
        ws.begin()
        roots = ws.checkpoint_roots(origin_run_id)
        local_inputs = ws.localize(inputs)
        lock = contextlib.nullcontext() if nodes.count > 1 else \
            launch.machine_lock(storage.scratch_root() if ws.remote else cfg.local_root, name)
        with lock:
            result = launch.launch(stage, cfg.to_json(), ws.work, local_inputs, run_id=str(run_id), resume_from=roots,
                                   env=tracking.wandb_env(cfg, name, str(run_id)), extra_args=extra_args,
                                   checkpoint_uri=ws.checkpoint_uri, nodes=nodes if nodes.count > 1 else None,
                                   module=module, gpus=gpus)
        if result is None:  # a node other than 0: nothing of its own to keep
            return None
        return ws.publish(result, {local: inputs[k] for k, local in local_inputs.items() if local != inputs[k]})
    finally:
        ws.close()


def prepare_data(cfg: RunConfig, run_id: str, attempt: int = 0) -> dict:
    """The `data` step: every dataset split as a Deep Lake dataset and the base models (tiny ones built here),
    under the local storage root (shared by the runs that use the same sources, seed and tiny specs), or built in
    scratch and uploaded to this attempt's `<root>/RLHFFlow/<run>/data/attempt-<k>/`."""
    from rlhf_lib import models
    from rlhf_lib.data.ingest import prepare_datasets

    ws = Workspace.of(cfg, run_id, "data", attempt)
    root = ws.work if ws.remote else cfg.local_root
    try:
        out = {"datasets": prepare_datasets(cfg, root),
               "policy_base": models.prepare(cfg.policy.model, cfg.policy.tiny, "policy", root, cfg.run.seed),
               "reward_base": models.prepare(cfg.reward_model.model, cfg.reward_model.tiny, "reward", root,
                                             cfg.run.seed)}
        return ws.publish(out, {}) if ws.remote else out
    finally:
        ws.close()


def uses_ai_feedback(cfg: RunConfig) -> bool:
    return cfg.data.preference.source == AI_FEEDBACK


def judge_ref(ref: str, policy_base: str) -> str:
    """A judge model reference: `tiny` means the tiny policy base the data step built."""
    return policy_base if ref == "tiny" else ref


def reward_models(cfg: RunConfig, run_id: str, origin_run_id: str | None, inputs: dict[str, str], attempt: int = 0
                  ) -> tuple[dict | None, dict | None]:
    """The proxy reward model (none when reward.function is the proxy) and, when the gold judge is a second reward
    model, that one too: trained on the other half of the pairs with another seed, so the methods never optimise
    what judges them."""
    gold_rm = cfg.gold_judge == "reward_model"
    proxy = None
    if cfg.reward.function:
        print(f"[reward] the online methods optimise the function {cfg.reward.function}: no proxy reward model",
              flush=True)
    else:
        proxy = run_stage(cfg, "reward", run_id, inputs, origin_run_id, attempt=attempt,
                          extra_args=["--part", "0/2"] if gold_rm else None)
    if not gold_rm:
        return proxy, None
    gold_cfg = validate({**cfg.model_dump(), "run": {**cfg.run.model_dump(), "seed": cfg.run.seed + 1}})
    gold = run_stage(gold_cfg, "reward", run_id, inputs, origin_run_id, name="reward_gold", attempt=attempt,
                     extra_args=["--part", "1/2"])
    return proxy, gold


def method_enabled(cfg: RunConfig, method: str) -> bool:
    enabled = method in cfg.run.methods
    if not enabled:
        print(f"[{method}] {SKIPPED}: not in run.methods {cfg.run.methods}", flush=True)
    return enabled


# ------------------------------------------------------------------ the methods (rlhf_lib/methods.py)


def method_inputs(flow, method: methods.Method, cfg: RunConfig) -> dict[str, str]:
    """The stage `--input`s a method's row asks for, from the upstream steps' artifacts."""
    inputs: dict[str, str] = {}
    for need in method.needs:
        if need == "sft_model":
            inputs["sft_model"] = flow.sft_merged_path
        elif need == "reward":
            from rlhf_lib import scoring  # imports torch: not in the steps that only route or skip

            inputs.update(scoring.reward_input(flow.reward_model_path, cfg.reward.function))
        elif need == "preference":
            inputs["train"] = flow.datasets["preference_train"]["uri"]
            inputs["eval"] = flow.datasets["preference_eval"]["uri"]
        elif need == "prompts":
            inputs["prompts"] = flow.datasets["prompts_train"]["uri"]
    return inputs


def _section(cfg: RunConfig, method: methods.Method) -> dict:
    return getattr(cfg, method.config_section).model_dump() if method.config_section else {}


def skipped_outcome(cfg: RunConfig, method: methods.Method) -> dict:
    """What a method not in run.methods stores: every outcome artifact exists, empty."""
    return {**{key: None for key in OUTCOME_KEYS + method.extras}, "status": SKIPPED, "metrics": {}, "stats": [],
            "config": _section(cfg, method)}


def run_method(flow, name: str, current) -> dict | None:
    """A method's step body: its stage on the inputs its registry row names (skipped when it is not in
    run.methods), continued from its own checkpoints on a retry or a resume. Returns the outcome to store (see
    `store_outcome`); None on the nodes of a gang other than node 0, which store nothing."""
    method = methods.get(name)
    cfg = config_from_flow(flow.config, flow.storage_root)
    if not method_enabled(cfg, name):
        return skipped_outcome(cfg, method)
    nodes = Nodes.of(current.parallel, current.run_id) if method.gang else None
    result = run_stage(cfg, name, current.run_id, method_inputs(flow, method, cfg), current.origin_run_id,
                       module=method.module, nodes=nodes, attempt=current.retry_count)
    if result is None:
        return None
    return {**{key: result.get(key) for key in OUTCOME_KEYS + method.extras}, "status": DONE,
            "metrics": result.get("metrics") or {}, "stats": result.get("stats") or [],
            "config": _section(cfg, method)}


def store_outcome(flow, name: str, outcome: dict | None) -> None:
    """A method's outcome as the `<name>_<key>` artifacts (`ppo_stats`, `dpo_model_path`, ...)."""
    for key, value in (outcome or {}).items():
        setattr(flow, f"{name}_{key}", value)


def outcome(run_data, name: str) -> dict:
    """A method's outcome read back from a step (`self`) or a finished run's `run.data`."""
    method = methods.get(name)
    return {key: getattr(run_data, f"{name}_{key}", None) for key in OUTCOME_KEYS + method.extras}


def done_methods(run_data) -> list[str]:
    """The methods of the registry that ran to completion in this run, in registry order."""
    return [m for m in methods.names() if getattr(run_data, f"{m}_status", None) == DONE]


def evaluate(flow, current) -> dict:
    """The `evaluate` step: SFT and every method that ran, on held-out prompts, by the proxy and the gold judge;
    with each online method's saved checkpoints (the over-optimisation curve)."""
    cfg = config_from_flow(flow.config, flow.storage_root)
    done = done_methods(flow)
    snapshots = {m: getattr(flow, f"{m}_snapshots_dir") for m in done
                 if cfg.eval.curve and methods.get(m).online and getattr(flow, f"{m}_snapshots_dir", None)}
    inputs = evaluation_inputs(flow, cfg, {m: getattr(flow, f"{m}_model_path") for m in done}, snapshots)
    result = run_stage(cfg, "evaluate", current.run_id, inputs, attempt=current.retry_count)
    report = add_stage_seconds(result["eval_report"], {m: getattr(flow, f"{m}_seconds") for m in done})
    return {"methods": done, "gold_judge": result["gold_judge"], "eval_report": report,
            "eval_samples": result["eval_samples"]}


def evaluation_inputs(artifacts, cfg: RunConfig, policies: dict[str, str], snapshots: dict[str, str]) -> dict:
    """What the evaluate stage reads, from anything holding a run's artifacts (the flow in its step, or a finished
    run's `Run(...).data`): the SFT model and `policies` (method -> model) to compare with it, the proxy reward, the
    held-out prompts and SFT eval set, the gold reward model when the run trained one, and `snapshots` (method ->
    directory of saved checkpoints) for the over-optimisation curve."""
    from rlhf_lib import scoring

    inputs = {"policy_sft": artifacts.sft_merged_path, **{f"policy_{m}": path for m, path in policies.items()},
              **scoring.reward_input(artifacts.reward_model_path, cfg.reward.function),
              "prompts": artifacts.datasets["prompts_eval"]["uri"], "sft_eval": artifacts.datasets["sft_eval"]["uri"],
              **{f"snapshots_{m}": directory for m, directory in snapshots.items()}}
    if artifacts.gold_reward_model_path:
        inputs["gold_reward_model"] = artifacts.gold_reward_model_path
    return inputs


def add_stage_seconds(report: dict, seconds: dict[str, float]) -> dict:
    """The report with each method's stage wall time (seconds inside the stage, not waiting for a turn)."""
    return {name: {**row, **({"stage_seconds": seconds[name]} if name in seconds else {})}
            for name, row in report.items()}
