"""What the flow's steps call: one function per step body, so flows/rlhf_flow.py only wires.

Stage outputs go to `<storage root>/RLHFFlow/<run id>/<stage>/`, a local directory or an S3 prefix (see
rlhf_lib/storage.py). Artifacts hold absolute paths or URIs, because `current.run_id` changes on `resume` while
cloned artifacts must still point at the origin run's files. With an S3 root a stage runs in a local scratch
directory on whatever machine runs the step: its inputs are downloaded first, its checkpoints uploaded as they are
written, everything else after it succeeds, `result.json` last; the artifacts then name the S3 URIs.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from rlhf_lib import checkpoints, launch, methods, scoring, storage, tracking
from rlhf_lib.config import AI_FEEDBACK, RunConfig, validate
from rlhf_lib.launch import Nodes
from rlhf_lib.methods import DONE, OUTCOME_KEYS, SKIPPED
from rlhf_lib.stages.common import RESULT_FILE, atomic_write_json, latest_trainer_checkpoint

FLOW_NAME = "RLHFFlow"
S3_DATASTORE_SUBDIR = "rlhf"  # stage outputs under the Metaflow S3 datastore's root, beside its own files


class OriginUnreachable(RuntimeError):
    """A `resume` whose origin run's checkpoints cannot be reached from this machine."""


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
    except (preflight.PreflightError, storage.StorageError) as err:
        raise CannotStart(str(err)) from None
    gpus = launch.visible_gpus()
    print(f"[start] profile {cfg.run.name}; methods {cfg.run.methods}; GPUs visible: {gpus}, run.gpus = {cfg.run.gpus}")
    for line in judge_costs(cfg):
        print(f"[start] {line}")
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


def stage_uri(cfg: RunConfig, run_id: str, stage: str) -> str:
    return storage.join(cfg.storage_uri, FLOW_NAME, str(run_id), stage)


def _scratch(run_id: str, stage: str) -> Path:
    return storage.scratch_root() / FLOW_NAME / str(run_id) / stage


def origin_checkpoints(cfg: RunConfig, origin_run_id: str | None, stage: str) -> str | None:
    """On `resume`, a local directory holding the newest checkpoint(s) the origin run left for this stage (its
    own directory when local; downloaded when in S3); None when the origin run never checkpointed the stage.
    Raises OriginUnreachable when the origin run's outputs cannot be reached: starting from step 0 instead
    would silently throw its work away."""
    if not origin_run_id:
        return None
    run_root = storage.join(cfg.storage_uri, FLOW_NAME, str(origin_run_id))
    remote = storage.join(stage_uri(cfg, origin_run_id, stage), "checkpoints")
    if not storage.is_remote(run_root):
        if not Path(run_root).is_dir():
            raise OriginUnreachable(
                f"[{stage}] resume: origin run {origin_run_id} stored its stage outputs and checkpoints under "
                f"{run_root}, which this machine cannot reach; resume where that directory is, or use an "
                f"s3:// run.storage_root (or Metaflow's S3 datastore) so every machine can")
        found = checkpoints.list_complete(remote) or latest_trainer_checkpoint(Path(remote))
        if found:
            print(f"[{stage}] resuming: origin run {origin_run_id} left checkpoints in {remote}", flush=True)
            return remote
    else:
        try:
            found = checkpoints.fetch_latest(remote, _scratch(origin_run_id, stage) / "checkpoints")
        except Exception as err:  # credentials, endpoint, bucket: say which, never fall back to step 0
            raise OriginUnreachable(
                f"[{stage}] resume: cannot reach origin run {origin_run_id}'s checkpoints at {remote}: "
                f"{type(err).__name__}: {err}") from err
        if found:
            print(f"[{stage}] resuming: origin run {origin_run_id} left {found.name} in {remote}", flush=True)
            return str(found.parent)
    print(f"[{stage}] origin run {origin_run_id} left no {stage} checkpoint: starting from step 0", flush=True)
    return None


def _rewrite(value, prefixes: dict[str, str]):
    """`value` with every string that starts with a local path in `prefixes` pointed at its URI instead."""
    if isinstance(value, dict):
        return {k: _rewrite(v, prefixes) for k, v in value.items()}
    if isinstance(value, list):
        return [_rewrite(v, prefixes) for v in value]
    if isinstance(value, str):
        for local, uri in prefixes.items():
            if value == local or value.startswith(local + "/"):
                return uri + value[len(local):]
    return value


def publish(work: Path, uri: str, result: dict, downloaded: dict[str, str] | None = None) -> dict:
    """Upload a finished stage's local directory to `uri` (checkpoints are there already), `result.json` last,
    with every local path in it turned into its URI; then free the scratch space. Returns the rewritten result."""
    prefixes = {str(Path(work).resolve()): uri, str(work): uri}
    for source, local in (downloaded or {}).items():  # downloaded inputs: name them by where they came from
        prefixes[local] = source
    result = _rewrite(result, prefixes)
    atomic_write_json(Path(work) / RESULT_FILE, result)
    storage.upload_dir(Path(work), uri, last=(RESULT_FILE,), skip_top=("checkpoints",))
    print(f"[storage] uploaded {work} -> {uri}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return result


def run_stage(cfg: RunConfig, stage: str, run_id: str, inputs: dict[str, str], origin_run_id: str | None = None,
              *, name: str | None = None, extra_args: list[str] | None = None, nodes: Nodes | None = None,
              module: str | None = None) -> dict | None:
    """Launch a stage through accelerate and return its result.json. It continues from the newest checkpoint of
    its own earlier attempt (a `@retry`) or, on a Metaflow `resume`, of the origin run. `name` (default: the
    stage) names the output directory, so one stage module can run twice in a step (the gold reward model).
    `nodes`: this machine's place in a multi-machine stage (`@parallel`); node 0 writes, stores and returns the
    result, the others return None.

    Stages on one machine take turns (a lock in a local directory): parallel branches of a local run would
    otherwise share its cores or GPUs and starve each other; on a cluster each step has its own machine. The
    nodes of one gang never wait for each other's turn: they must all run at once."""
    name = name or stage
    nodes = nodes or Nodes()
    uri = stage_uri(cfg, run_id, name)
    remote = storage.is_remote(uri)
    work = _scratch(run_id, name) if remote else Path(uri)
    checkpoint_uri = storage.join(uri, "checkpoints")
    resume_from = origin_checkpoints(cfg, origin_run_id, name)
    if nodes.index > 0:  # every rank loads the checkpoint rank 0 continues from; only rank 0 writes any
        work = work.with_name(f"{name}-node-{nodes.index}")
        if not remote and (checkpoints.list_complete(checkpoint_uri) or
                           latest_trainer_checkpoint(Path(checkpoint_uri))):
            resume_from = checkpoint_uri
    local_inputs = dict(inputs)
    if remote:
        own = checkpoints.fetch_latest(checkpoint_uri, work / "checkpoints")
        if own:
            print(f"[{name}] an earlier attempt of this task stored {own.name} in {checkpoint_uri}: continuing "
                  f"from it", flush=True)
        local_inputs = {k: storage.localize(v) for k, v in inputs.items()}
    lock = contextlib.nullcontext() if nodes.count > 1 else \
        launch.machine_lock(storage.scratch_root() if remote else cfg.local_root, name)
    with lock:
        result = launch.launch(stage, cfg.to_json(), work, local_inputs, run_id=str(run_id), module=module,
                               resume_from=resume_from, env=tracking.wandb_env(cfg, name, str(run_id)),
                               extra_args=extra_args, checkpoint_uri=checkpoint_uri if remote else None,
                               nodes=nodes if nodes.count > 1 else None)
    if result is None:  # a node other than 0: nothing of its own to keep
        if remote:
            shutil.rmtree(work, ignore_errors=True)
        return None
    if remote:
        result = publish(work, uri, result, {inputs[k]: v for k, v in local_inputs.items() if v != inputs[k]})
    return result


def prepare_data(cfg: RunConfig, run_id: str) -> dict:
    """The `data` step: every dataset split as a Deep Lake dataset and the base models (tiny ones built here),
    under the local storage root, or built in scratch and uploaded to `<root>/RLHFFlow/<run>/data/`."""
    from rlhf_lib import models
    from rlhf_lib.data.ingest import prepare_datasets

    uri = stage_uri(cfg, run_id, "data")
    root = _scratch(run_id, "data") if storage.is_remote(uri) else cfg.local_root
    out = {"datasets": prepare_datasets(cfg, root),
           "policy_base": models.prepare(cfg.policy.model, cfg.policy.tiny, "policy", root, cfg.run.seed),
           "reward_base": models.prepare(cfg.reward_model.model, cfg.reward_model.tiny, "reward", root,
                                         cfg.run.seed)}
    return publish(root, uri, out) if storage.is_remote(uri) else out


def uses_ai_feedback(cfg: RunConfig) -> bool:
    return cfg.data.preference.source == AI_FEEDBACK


def judge_ref(ref: str, policy_base: str) -> str:
    """A judge model reference: `tiny` means the tiny policy base the data step built."""
    return policy_base if ref == "tiny" else ref


def reward_models(cfg: RunConfig, run_id: str, origin_run_id: str | None, inputs: dict[str, str]
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
        proxy = run_stage(cfg, "reward", run_id, inputs, origin_run_id, extra_args=["--part", "0/2"] if gold_rm else None)
    if not gold_rm:
        return proxy, None
    gold_cfg = validate({**cfg.model_dump(), "run": {**cfg.run.model_dump(), "seed": cfg.run.seed + 1}})
    gold = run_stage(gold_cfg, "reward", run_id, inputs, origin_run_id, name="reward_gold",
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
                       module=method.module, nodes=nodes)
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
    inputs = {"policy_sft": flow.sft_merged_path, **{f"policy_{m}": getattr(flow, f"{m}_model_path") for m in done},
              **scoring.reward_input(flow.reward_model_path, cfg.reward.function),
              "prompts": flow.datasets["prompts_eval"]["uri"], "sft_eval": flow.datasets["sft_eval"]["uri"]}
    if cfg.eval.curve:
        inputs.update({f"snapshots_{m}": getattr(flow, f"{m}_snapshots_dir") for m in done
                       if methods.get(m).online and getattr(flow, f"{m}_snapshots_dir", None)})
    if flow.gold_reward_model_path:
        inputs["gold_reward_model"] = flow.gold_reward_model_path
    result = run_stage(cfg, "evaluate", current.run_id, inputs)
    report = add_stage_seconds(result["eval_report"], {m: getattr(flow, f"{m}_seconds") for m in done})
    return {"methods": done, "gold_judge": result["gold_judge"], "eval_report": report,
            "eval_samples": result["eval_samples"]}


def add_stage_seconds(report: dict, seconds: dict[str, float]) -> dict:
    """The report with each method's stage wall time (seconds inside the stage, not waiting for a turn)."""
    return {name: {**row, **({"stage_seconds": seconds[name]} if name in seconds else {})}
            for name, row in report.items()}
