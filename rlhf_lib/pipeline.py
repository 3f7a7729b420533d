"""What the flow's steps call: one function per step body, so flows/rlhf_flow.py only wires.

Stage outputs go to `<storage root>/RLHFFlow/<run id>/<stage>/attempt-<k>/`, a local directory or an S3 prefix,
one per attempt of the task (rlhf_lib/workspace.py). Artifacts hold absolute paths or URIs, because
`current.run_id` changes on `resume` while cloned artifacts must still point at the origin run's files. With an S3
root a stage runs in a local scratch directory on whatever machine runs the step: its inputs are downloaded first,
its checkpoints uploaded as they are written, everything else after it succeeds, `result.json` last; the artifacts
then name the S3 URIs.

The methods (rlhf_lib/methods.py) all go through `method_step`: the inputs their row asks for, their stage, their
outcome stored as `<name>_<key>` artifacts, their card when the row has one.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from rlhf_lib import launch, live, machine, methods, metrics, storage, tracking, workspace
from rlhf_lib.config import AI_FEEDBACK, RunConfig, config_from_flow, validate
from rlhf_lib.launch import Nodes
from rlhf_lib.methods import DONE, OUTCOME_KEYS, SKIPPED
from rlhf_lib.stages import contract
from rlhf_lib.workspace import Workspace

ONE_NODE, GANG = "one_node", "gang"  # a gang method's two routes (the `<name>_layout` artifact)


def start(config_value, datastore_type: str | None) -> dict:
    """The `start` step: resolve where outputs go, check everything that could fail an hour in, say what the run
    will do. Returns the artifacts to store. A problem found here stops the run with the diagnosis alone, not a
    traceback through Metaflow."""
    from metaflow.exception import MetaflowException

    from rlhf_lib import env, preflight

    class CannotStart(MetaflowException):  # Metaflow shows the message alone, no traceback
        headline = "The run cannot start"

    try:
        storage_root = workspace.resolve_storage_root(config_from_flow(config_value), datastore_type)
        cfg = config_from_flow(config_value, storage_root)
        source = env.metaflow_config_source()
        print(f"[start] Metaflow config: {source}; datastore: {datastore_type}")
        print(f"[start] stage outputs and checkpoints: {storage_root}")
        preflight.check_or_raise(cfg)
    except (preflight.PreflightError, storage.StorageError) as err:
        raise CannotStart("\n".join(getattr(err, "problems", [str(err)]))) from None
    gpus = launch.visible_gpus()
    print(f"[start] profile {cfg.run.name}; methods {cfg.run.methods}; GPUs visible: {gpus}, run.gpus = {cfg.run.gpus}")
    revisions = preflight.model_revisions(cfg)
    plans = [m.plan(cfg) for m in map(methods.get, cfg.run.methods) if m.plan]
    for line in preflight.judge_costs(cfg) + plans + [f"{ref} is pinned at commit {sha}" for ref, sha in revisions.items()]:
        print(f"[start] {line}")
    return {"datastore_type": datastore_type, "storage_root": storage_root, "metaflow_config": source,
            "run_config": cfg.model_dump(), "gpus_visible": gpus, "judges": preflight.judge_costs(cfg),
            "model_revisions": revisions}


def run_stage(cfg: RunConfig, stage: str, run_id: str, inputs: dict[str, str], origin_run_id: str | None = None,
              *, name: str | None = None, extra_args: list[str] | None = None, nodes: Nodes | None = None,
              module: str | None = None, attempt: int = 0) -> dict | None:
    """Launch a stage and return its result.json. `attempt` is Metaflow's retry count: each attempt works under its
    own prefix, and continues from the newest checkpoint that loads among its task's earlier attempts and, on a
    Metaflow `resume`, the origin run's. `name` (default: the stage) names the output directory, so one stage
    module can run twice in a step (the gold reward model). `nodes`: this machine's place in a multi-machine stage
    (`@parallel`); node 0 writes, stores and returns the result, the others return None.

    Stages on one machine take turns (a lock in a local directory): parallel branches of a local run would
    otherwise share its cores or GPUs and starve each other; on a cluster each step has its own machine. The
    nodes of one gang never wait for each other's turn: they must all run at once."""
    name = name or stage
    nodes = nodes or Nodes()
    ws = Workspace.of(cfg, run_id, name, attempt, nodes.index)
    gpus = machine.check_machine(cfg, name, ws.work)
    try:
        ws.begin()
        roots = ws.checkpoint_roots(origin_run_id)
        local_inputs = ws.localize(inputs)
        env = {**tracking.wandb_env(cfg, name, str(run_id)), **ws.models_here(local_inputs)}
        lock = contextlib.nullcontext() if nodes.count > 1 else launch.machine_lock(ws.lock_root, name)
        # the step's live card follows a training stage's progress while it runs (on a gang, node 0's)
        watch = live.watching(ws.work, name, cfg.run.card_refresh_s) if name in live.STAGES and nodes.index == 0 \
            else contextlib.nullcontext()
        with lock, watch:
            result = launch.launch(stage, cfg.to_json(), ws.work, local_inputs, run_id=str(run_id), resume_from=roots,
                                   env=env, extra_args=extra_args,
                                   checkpoint_uri=ws.checkpoint_uri, nodes=nodes if nodes.count > 1 else None,
                                   module=module, gpus=gpus)
        if result is None:  # a node other than 0: nothing of its own to keep
            return None
        return ws.publish(result, {local: inputs[k] for k, local in local_inputs.items() if local != inputs[k]})
    finally:
        ws.close()


def prepare_data(cfg: RunConfig, run_id: str, attempt: int = 0, revisions: dict | None = None) -> dict:
    """The `data` step: every dataset split as a Deep Lake dataset and the base models (tiny ones built here; hub
    ids pinned to the commits `start` recorded, `revisions`), where the workspace keeps data: the local storage
    root (shared by the runs that use the same sources, seed and tiny specs), or this attempt's scratch, published
    to `<root>/RLHFFlow/<run>/data/attempt-<k>/`."""
    from rlhf_lib import hub, models
    from rlhf_lib.data.ingest import prepare_datasets

    ws = Workspace.of(cfg, run_id, "data", attempt)
    root = ws.data_root
    try:
        out = {"datasets": prepare_datasets(cfg, root),
               "policy_base": hub.pin(models.prepare(cfg.policy.model, cfg.policy.tiny, "policy", root,
                                                     cfg.run.seed), revisions),
               "reward_base": hub.pin(models.prepare(cfg.reward_model.model, cfg.reward_model.tiny, "reward", root,
                                                     cfg.run.seed), revisions)}
        return ws.publish(out, {})
    finally:
        ws.close()


def uses_ai_feedback(cfg: RunConfig) -> bool:
    return cfg.data.preference.source == AI_FEEDBACK


def judge_ref(ref: str, policy_base: str, revisions: dict | None = None) -> str:
    """A judge model reference: `tiny` means the tiny policy base the data step built; a hub id, its pinned commit."""
    from rlhf_lib import hub

    return policy_base if ref == "tiny" else hub.pin(ref, revisions)


def reward_models(cfg: RunConfig, run_id: str, origin_run_id: str | None, inputs: dict[str, str], attempt: int = 0
                  ) -> tuple[dict | None, dict | None]:
    """The proxy reward model (none when reward.function is the proxy) and, when the gold judge is a second reward
    model, that one too: trained on the other half of the pairs with another seed, so the methods never optimise
    what judges them."""
    gold_rm = cfg.resolved_gold_judge == "reward_model"
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


# ------------------------------------------------------------------ the methods (rlhf_lib/methods.py)


def method_inputs(flow, method: methods.Method, cfg: RunConfig) -> dict[str, str]:
    """The stage `--input`s a method's row asks for, from the upstream steps' artifacts."""
    inputs: dict[str, str] = {}
    for need in method.needs:
        if need == "sft_model":
            inputs["sft_model"] = flow.sft_merged_path
        elif need == "reward":
            inputs.update(contract.reward_input(flow.reward_model_path, cfg.reward.function))
        elif need == "preference":
            inputs["train"] = flow.datasets["preference_train"]["uri"]
            inputs["eval"] = flow.datasets["preference_eval"]["uri"]
        elif need == "prompts":
            inputs["prompts"] = flow.datasets["prompts_train"]["uri"]
    return inputs


def _section(cfg: RunConfig, method: methods.Method) -> dict:
    return getattr(cfg, method.name).model_dump() if method.settings else {}


def skipped_outcome(cfg: RunConfig, method: methods.Method) -> dict:
    """What a method not in run.methods stores: every outcome artifact exists, empty."""
    return {**{key: None for key in OUTCOME_KEYS + method.extras}, "status": SKIPPED, "metrics": {}, "stats": [],
            "config": _section(cfg, method)}


def run_method(flow, name: str, current) -> dict | None:
    """A method's stage on the inputs its registry row names (skipped when it is not in run.methods), continued
    from its own checkpoints on a retry or a resume. Returns the outcome to store (see `store_outcome`); None on
    the nodes of a gang other than node 0, which store nothing."""
    method = methods.get(name)
    cfg = config_from_flow(flow.config, flow.storage_root)
    if name not in cfg.run.methods:
        print(f"[{name}] {SKIPPED}: not in run.methods {cfg.run.methods}", flush=True)
        return skipped_outcome(cfg, method)
    nodes = Nodes.of(current.parallel, current.run_id) if getattr(current, "is_parallel", False) else None
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


def method_step(flow, name: str, current) -> None:
    """A method's step body: run it, store its outcome, and draw its card when this step carries it."""
    store_outcome(flow, name, run_method(flow, name, current))
    if methods.get(name).last_step == current.step_name:
        method_card(flow, name, current)


def route(flow, name: str) -> None:
    """A gang method's first step: `<name>_layout` says which route its branch takes — one node (a plain step, on
    any backend) or a `@parallel` gang across `<name>_nodes` machines (run.nodes >= 2, and the method runs)."""
    cfg = config_from_flow(flow.config, flow.storage_root)
    gang = cfg.run.nodes > 1 and name in cfg.run.methods
    setattr(flow, f"{name}_layout", GANG if gang else ONE_NODE)
    setattr(flow, f"{name}_nodes", cfg.run.nodes if gang else 1)
    print(f"[{name}] " + (f"a gang across {cfg.run.nodes} nodes" if gang else "one node: a plain step"), flush=True)


def join_gang(flow, name: str, inputs) -> None:
    """A gang's join: node 0's outcome (only it sets the `<name>_*` artifacts)."""
    flow.merge_artifacts(inputs)


def method_card(flow, name: str, current) -> None:
    """The method's card (its training curves), on the step that carries it (`Method.last_step`, `card=True`): it
    replaces the live card that step showed while it trained."""
    if methods.get(name).card:
        from rlhf_lib import report

        current.card.clear()
        report.build_method_card(current.card, flow, name)


def done_methods(run_data) -> list[str]:
    """The methods of the registry that ran to completion in this run, in registry order."""
    return [m for m in methods.names() if getattr(run_data, f"{m}_status", None) == DONE]


def evaluate(flow, current) -> dict:
    """The `evaluate` step: SFT and every method that ran, on held-out prompts, by the proxy and the gold judge;
    with the saved checkpoints of each method that keeps snapshots (the over-optimisation curve)."""
    cfg = config_from_flow(flow.config, flow.storage_root)
    done = done_methods(flow)
    snapshots = {m: getattr(flow, f"{m}_snapshots_dir") for m in done
                 if cfg.eval.curve and methods.get(m).snapshots and getattr(flow, f"{m}_snapshots_dir", None)}
    inputs = evaluation_inputs(flow, cfg, {m: getattr(flow, f"{m}_model_path") for m in done}, snapshots)
    result = run_stage(cfg, "evaluate", current.run_id, inputs, attempt=current.retry_count)
    report = add_stage_seconds(result["eval_report"], {m: getattr(flow, f"{m}_seconds") for m in done})
    return {"methods": done, "gold_judge": result["gold_judge"], "eval_report": report,
            "eval_samples": result["eval_samples"], "eval_report_path": result["report_path"],
            **recommendations(flow, report)}


def recommendations(artifacts, report: dict) -> dict:
    """`<method>_recommended_step` and `<method>_recommended_path` for every method of the registry: the guard's
    checkpoint (rlhf_lib/guard.py) and where it is — the merged model at the last step, the adapter snapshot of an
    earlier one, the SFT model at step 0; None for a method without a curve."""
    out = {}
    for name in methods.names():
        verdict = (report.get(name) or {}).get("guard")
        step = verdict["recommended_step"] if verdict else None
        if step is None:
            path = None
        elif step == 0:
            path = artifacts.sft_merged_path
        elif step == verdict["last_step"]:
            path = getattr(artifacts, f"{name}_model_path")
        else:
            path = storage.join(getattr(artifacts, f"{name}_snapshots_dir"), f"step-{step:06d}")
        out.update({f"{name}_recommended_step": step, f"{name}_recommended_path": path})
    return out


def evaluation_inputs(artifacts, cfg: RunConfig, policies: dict[str, str], snapshots: dict[str, str]) -> dict:
    """What the evaluate stage reads, from anything holding a run's artifacts (the flow in its step, or a finished
    run's `Run(...).data`): the SFT model and `policies` (method -> model) to compare with it, the proxy reward, the
    held-out prompts and SFT eval set, the gold reward model when the run trained one, and `snapshots` (method ->
    directory of saved checkpoints) for the over-optimisation curve."""
    inputs = {"policy_sft": artifacts.sft_merged_path, **{f"policy_{m}": path for m, path in policies.items()},
              **contract.reward_input(artifacts.reward_model_path, cfg.reward.function),
              "prompts": artifacts.datasets["prompts_eval"]["uri"], "sft_eval": artifacts.datasets["sft_eval"]["uri"],
              **{f"snapshots_{m}": directory for m, directory in snapshots.items()}}
    if artifacts.gold_reward_model_path:
        inputs["gold_reward_model"] = artifacts.gold_reward_model_path
    if cfg.resolved_gold_judge == "judge_model":
        inputs["gold_judge_model"] = judge_ref(cfg.eval.gold_judge_model, artifacts.policy_base,
                                               getattr(artifacts, "model_revisions", None))
    return inputs


def add_stage_seconds(report: dict, seconds: dict[str, float]) -> dict:
    """The report with each method's stage wall time (seconds inside the stage, not waiting for a turn)."""
    return {name: {**row, **({metrics.STAGE_SECONDS: seconds[name]} if name in seconds else {})}
            for name, row in report.items()}


def end(flow, current) -> None:
    """The `end` step: remove what no artifact of the run references (failed attempts, their checkpoints and
    snapshots, the READING marks, open multipart uploads; rlhf_lib/cleanup.py), then say where everything is."""
    from rlhf_lib import cleanup, report

    cfg = config_from_flow(flow.config, flow.storage_root)
    artifacts = {name: getattr(flow, name) for name, _ in flow._datastore.items() if not name.startswith("_")}
    done = cleanup.clean_run(flow.storage_root, current.run_id, artifacts, current.origin_run_id,
                             keep_failed=cfg.run.keep_failed_attempts)
    for attempt in done["removed"]:
        print(f"[end] removed {attempt}: an attempt no artifact of this run references", flush=True)
    if done["aborted_uploads"]:
        print(f"[end] aborted {done['aborted_uploads']} unfinished multipart upload(s)", flush=True)
    for warning in done["warnings"]:
        print(f"[end] warning: {warning}", flush=True)
    print(report.summary(flow))
