"""On a cluster: the code package, the Argo compile, the user's Metaflow config, and — against a real S3 server —
the compare flow (a method of each stage shape, AI feedback, the gold reward model) run step by step as pods would
run it, a preempted PPO task retried in the same run from what its first attempt stored in S3, and `resume ppo` on a
machine with none of the crashed run's local files; and an attempt given up for dead that keeps running.

Pods are simulated by `tests/podsim` (`--with podsim`): each task attempt runs in a pod directory of its own,
laid out like the project's image (with a decoy `rlhf_lib` that raises on import where the image has the
project), with its own HOME and TMPDIR, Metaflow's settings as environment variables only, and — as root here —
chrooted in its own mount namespace where the checkout, the launcher's home, other pods' files and the local
datastore do not exist. The pod directory is deleted when the attempt ends.
"""

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT, S3_CREDENTIALS, one_node_steps, smoke_sections, write_config
from rlhf_lib import methods
from rlhf_lib.launch import stage_process

FLOW = str(ROOT / "flows" / "rlhf_flow.py")
PODSIM = str(ROOT / "tests" / "podsim")
# What the project sets for itself when the user has no Metaflow config: a "user" must not inherit it.
PROJECT_METAFLOW_VARS = ("RLHF_METAFLOW_CONFIG", "METAFLOW_HOME", "METAFLOW_DATASTORE_SYSROOT_LOCAL",
                         "METAFLOW_DEFAULT_DATASTORE", "METAFLOW_DEFAULT_METADATA")
WANDB_SECRET = "wandb-key-do-not-store-0123456789"
# configs/compare.toml (every method) with AI feedback and a gold reward model, cut to what CI can afford: the
# test profile's models and step counts; long enough to kill PPO after its second checkpoint with steps to go.
COMPARE = ROOT / "configs" / "compare.toml"
TEST_SIZES = tomllib.loads((ROOT / "configs" / "test.toml").read_text())
SMALL = {"run": {"cpu_threads": 1, "retries": 1, "local_retries": 1},
         "policy": {"tiny": {**TEST_SIZES["policy"]["tiny"], "pretrain_steps": 20}},
         "reward_model": {"tiny": TEST_SIZES["reward_model"]["tiny"]},
         "data": {"sample_rows": 300, "preference": {"source": "ai_feedback", "eval_rows": 8}},
         "rlaif": {"judge_model": "tiny", "num_prompts": 320, "max_new_tokens": 24},
         "eval": {"num_prompts": 8, "gold_judge": "reward_model", "curve_prompts": 4, "max_new_tokens": 24},
         "sft": {"max_steps": 10, "save_steps": 5}, "reward": {"max_steps": 20, "save_steps": 10},
         "ppo": {"steps": 12, "save_freq": 3, "batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2},
         "dpo": {"max_steps": 6, "save_steps": 3, "eval_steps": 6, "batch_size": 4},
         "rest": {"grow_steps": 1, "prompts_per_grow": 8, "max_steps": 3, "thresholds": [0.5]},
         "grpo": {"max_steps": 4, "save_steps": 2, "batch_size": 8}, "rloo": {"max_steps": 4, "save_steps": 2,
                                                                             "batch_size": 8}}
SMALL.update(smoke_sections(SMALL))  # a method added to the registry since: a few steps
# One method of each stage shape runs on S3 in pods: our PPO (killed, retried and resumed), the preference stage
# (DPO; KTO is the same stage), ReST, and TRL's online trainers (GRPO; RLOO is the same stage). Every method of the
# registry runs in the shared local flow (conftest's flow_run); the others here finish at once, `skipped`, in
# pods of their own. Six methods in pods took CI's 30 minutes to the edge.
S3_METHODS = ["ppo", "dpo", "rest", "grpo"]
STEPS = one_node_steps()


def user_env(home: Path, **extra) -> dict:
    """The environment of a user whose own Metaflow config lives in `home`."""
    env = {k: v for k, v in os.environ.items() if k not in PROJECT_METAFLOW_VARS}
    return {**env, "HOME": str(home), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **extra}


def s3_user(tmp: Path, endpoint: str) -> tuple[Path, dict, str]:
    """A new bucket, a HOME whose ~/.metaflowconfig/config.json names it as the S3 datastore, and that user's
    environment."""
    import uuid

    import boto3

    bucket = f"rlhf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(Bucket=bucket)
    home = tmp / "home"
    (home / ".metaflowconfig").mkdir(parents=True)
    (home / ".metaflowconfig" / "config.json").write_text(json.dumps({
        "METAFLOW_DEFAULT_DATASTORE": "s3", "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{bucket}/metaflow",
        "METAFLOW_S3_ENDPOINT_URL": endpoint, "METAFLOW_DEFAULT_METADATA": "local",
        # Stands in for the metadata service a deployment has: where runs are recorded, not a step's files.
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(tmp / "metadata")}))
    env = user_env(home, **S3_CREDENTIALS, RLHF_SCRATCH_DIR=str(tmp / "scratch"), PODSIM_ROOT=str(tmp / "pods"),
                   PYTHONPATH=PODSIM, WANDB_API_KEY=WANDB_SECRET)
    env.pop("METAFLOW_S3_ENDPOINT_URL", None)  # from the user's config only
    (tmp / "pods").mkdir()
    return home, env, bucket


def _boto_credentials() -> dict:
    return {"aws_access_key_id": S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], "region_name": "us-east-1"}


# ------------------------------------------------------------------ quick checks


def test_code_package_holds_rlhf_lib_and_configs(tmp_path):
    """A pod gets only the code package: it must hold rlhf_lib and configs/, and import them from there."""
    subprocess.run([sys.executable, FLOW, "package", "save", str(tmp_path / "job.tar")], check=True,
                   capture_output=True, timeout=120)
    pod = tmp_path / "pod"
    with tarfile.open(tmp_path / "job.tar") as tar:
        tar.extractall(pod, filter="data")
    assert (pod / "rlhf_flow.py").is_file()
    assert (pod / ".mf_code" / "rlhf_lib" / "stages" / "ppo" / "trainer.py").is_file()
    assert (pod / ".mf_code" / "configs" / "constitution.txt").is_file()
    check = ("import rlhf_lib.stages.ppo.trainer, rlhf_lib.config as c; "
             "print(rlhf_lib.__file__); print(c.DEFAULT_CONSTITUTION.is_file())")
    env = {**user_env(tmp_path), "PYTHONPATH": str(pod / ".mf_code")}
    out = subprocess.run([sys.executable, "-c", check], cwd=pod, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    where, constitution = out.stdout.split()[:2]
    assert Path(where).is_relative_to(pod) and constitution == "True"


def _argo_templates(cfg: Path, s3_env: dict, tmp_path: Path) -> dict:
    env = user_env(tmp_path, **{k: v for k, v in s3_env.items() if k != "BUCKET"}, METAFLOW_DEFAULT_DATASTORE="s3",
                   METAFLOW_DATASTORE_SYSROOT_S3=f"s3://{s3_env['BUCKET']}/metaflow",
                   METAFLOW_KUBERNETES_NAMESPACE="rlhf")
    proc = subprocess.run([sys.executable, FLOW, "--config", "config", str(cfg), "--with", "kubernetes",
                           "argo-workflows", "create", "--only-json"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    workflow = json.loads(proc.stdout[proc.stdout.index("{"):])
    return {t["name"]: t for t in workflow["spec"]["templates"]}


def _requests(template: dict) -> dict:
    res = template["container"]["resources"]
    shm = [v for v in template.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"
           and "sizeLimit" in v["emptyDir"]]
    return {"gpu": int(res["limits"].get("nvidia.com/gpu", "0")), "cpu": float(res["requests"]["cpu"]),
            "memory_mb": float(res["requests"]["memory"].rstrip("M")),
            "disk_mb": float(res["requests"]["ephemeral-storage"].rstrip("M")),
            "shared_memory_mb": float(shm[0]["emptyDir"]["sizeLimit"].rstrip("Mi")) if shm else None}


# What a step with nothing to do asks for under @kubernetes: Metaflow's own floor (its decorator keeps the larger of
# @resources and its defaults: 1 CPU, 4096 MB of memory, 10240 MB of disk).
KUBERNETES_FLOOR = {"gpu": 0, "cpu": 1.0, "memory_mb": 4096.0, "disk_mb": 10240.0, "shared_memory_mb": None}


def _dag_tasks(templates: dict) -> dict:
    return {t["name"]: t for template in templates.values() for t in template.get("dag", {}).get("tasks", [])}


def test_argo_workflow_asks_each_step_for_what_it_uses(s3_env, tmp_path):
    """configs/opt-1.3b.toml (PPO only, 8 GPUs, one node): GPUs only where a stage uses them, each kind of step the
    CPU, memory, shared memory and disk of its [resources] entry, the least a scheduler takes for the steps with
    nothing to do; PPO on one node is a plain pod, and the gang's JobSet is reached only through the `ppo` switch
    when run.nodes >= 2."""
    from rlhf_lib import config

    cfg = config.load(ROOT / "configs" / "opt-1.3b.toml")
    assert cfg.run.methods == ["ppo"] and cfg.run.gpus == 8 and cfg.run.nodes == 1
    templates = _argo_templates(ROOT / "configs" / "opt-1.3b.toml", s3_env, tmp_path)
    kinds = {"data": "light", "sft": "train", "merge": "infer", "reward": "train", "ppo-train": "train",
             "evaluate": "infer"}
    gpus = {"light": 0, "train": 8, "infer": 1}
    for step, kind in kinds.items():
        want = getattr(cfg.resources, kind)
        assert _requests(templates[step]) == {"gpu": gpus[kind], "cpu": want.cpu, "memory_mb": want.memory_mb,
                                              "disk_mb": want.disk_mb, "shared_memory_mb": want.shared_memory_mb}, step
    for step in ["rlaif"] + [m for m in methods.names() if m not in cfg.run.methods]:  # skipped: the least there is
        assert _requests(templates[step]) == KUBERNETES_FLOOR, step
    assert "container" in templates["ppo-train"] and "JobSet" not in json.dumps(templates["ppo-train"])
    jobsets = [name for name, t in templates.items() if "JobSet" in json.dumps(t.get("resource", {}))]
    assert jobsets == ["ppo-gang-train"]
    tasks = _dag_tasks(templates)
    assert "ppo_gang" in tasks["ppo-gang"]["when"] and "ppo_train" in tasks["ppo-train"]["when"]
    for step in ("start", "ppo", "ppo-gang", "ppo-gang-join", "ppo-join", "end"):  # routing steps: no GPU
        assert _requests(templates[step])["gpu"] == 0, step
    assert "rlhf_lib" not in json.dumps(templates["sft"]["container"]["env"])  # the code comes in the package


def test_argo_gang_spans_run_nodes_and_ai_feedback_puts_rlaif_on_a_gpu(s3_env, tmp_path):
    cfg = write_config(tmp_path / "cfg.toml", {"run": {"gpus": 2, "nodes": 3, "methods": ["ppo", "grpo"]},
                                                "data": {"preference": {"source": "ai_feedback"}}})
    templates = _argo_templates(cfg, s3_env, tmp_path)
    assert _requests(templates["rlaif"])["gpu"] == 1 and _requests(templates["grpo"])["gpu"] == 2
    assert _requests(templates["dpo"]) == KUBERNETES_FLOOR
    manifest = templates["ppo-gang-train"]["resource"]["manifest"]
    # run.nodes reaches the JobSet at run time: `ppo_gang` fans out to num_parallel = run.nodes workers.
    assert "kind: JobSet" in manifest and "nvidia.com/gpu: '2'" in manifest and "workerCount" in manifest


GPU_POOL = {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}


def test_gpu_steps_go_to_the_gpu_node_pool(s3_env, tmp_path):
    """[resources] node selectors and tolerations reach the GPU steps' pods (a GPU pool's label and taint), and only
    those: data and the steps with nothing to do stay off the GPU pool."""
    base = tomllib.loads((ROOT / "configs" / "opt-1.3b.toml").read_text())["resources"]
    cfg = write_config(tmp_path / "cfg.toml", {"run": {"gpus": 8, "methods": ["ppo"]}, "resources": {
        "train": {**base["train"], **GPU_POOL}, "infer": {**base["infer"], **GPU_POOL}, "light": base["light"]}})
    templates = _argo_templates(cfg, s3_env, tmp_path)
    for step in ("sft", "merge", "reward", "ppo-train", "evaluate"):
        spec = templates[step]
        assert spec.get("nodeSelector") == GPU_POOL["node_selector"], step
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"], step
    for step in ("data", "dpo", "rlaif", "start", "end"):
        assert "nvidia.com/gpu" not in json.dumps(templates[step].get("tolerations", [])), step
        assert not templates[step].get("nodeSelector"), step


def test_users_metaflow_config_wins(tmp_path):
    probe = ("import os; from rlhf_lib import env; env.configure(); "
             "print(os.environ.get('METAFLOW_HOME', '-')); print(env.metaflow_config_source())")
    run = lambda e: subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=e, capture_output=True,  # noqa: E731
                                   text=True, timeout=60).stdout.splitlines()
    home = tmp_path / "home"
    home.mkdir()
    home_var, source = run(user_env(home))
    assert home_var.endswith(".metaflowconfig") and source.startswith("the project's default")
    (home / ".metaflowconfig").mkdir()
    (home / ".metaflowconfig" / "config.json").write_text('{"METAFLOW_DEFAULT_DATASTORE": "s3"}')
    home_var, source = run(user_env(home))
    assert home_var == "-" and source == f"yours: {home / '.metaflowconfig' / 'config.json'}"
    home_var, source = run(user_env(tmp_path / "empty", METAFLOW_PROFILE="k8s"))
    assert home_var == "-" and "METAFLOW_PROFILE=k8s" in source


# ------------------------------------------------------------------ whole runs against S3


def _objects(bucket: str) -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["METAFLOW_S3_ENDPOINT_URL"], **_boto_credentials())
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _run_and_kill_ppo(cmd: list[str], env: dict, bucket: str, prefix: str, kill_after: list[tuple[int, int]],
                      cwd: Path, log_path: Path) -> tuple[str, int, str]:
    """Run the flow; SIGKILL its PPO subprocess each time the next (attempt, checkpoint count) in `kill_after` is
    complete in S3 under s3://bucket/prefix/RLHFFlow/<run id>/ppo/attempt-<k>/checkpoints.
    Returns (run id, exit code, log)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["METAFLOW_S3_ENDPOINT_URL"], **_boto_credentials())
    targets = [f"ppo/attempt-{a}/checkpoints/step-{n * SMALL['ppo']['save_freq']:06d}/COMPLETE"
               for a, n in kill_after]
    run_id, deadline = None, time.time() + 1500
    with open(log_path, "w") as log:  # a file, not a pipe: an unread pipe would block the flow when full
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)
        while targets and time.time() < deadline and proc.poll() is None:
            keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                                     Prefix=f"{prefix}/")
                    for o in page.get("Contents", [])]
            done = [k for k in keys if k.endswith(targets[0])]
            stage = stage_process(proc.pid, "ppo") if done else None
            if stage is not None:
                stage.send_signal(signal.SIGKILL)
                run_id = done[0][len(prefix):].split("/")[2]  # <prefix>/RLHFFlow/<run id>/ppo/...
                targets.pop(0)
            time.sleep(0.2)
        proc.wait(timeout=1500)
    text = log_path.read_text()
    assert not targets, f"PPO never reached {targets[0]} in S3:\n{text[-3000:]}"
    return run_id, proc.returncode, text


CLIENT = """
import json, sys
sys.path.insert(0, {root!r})
from rlhf_lib import env
env.configure()
from metaflow import Run

run = Run("RLHFFlow/{run_id}")
found = []

def walk(where, value):
    if isinstance(value, dict):
        for k, v in value.items():
            walk(f"{{where}}.{{k}}", v)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            walk(f"{{where}}[{{i}}]", v)
    elif isinstance(value, str) and (value.startswith(("/", "s3://")) or "/RLHFFlow/" in value):
        found.append([where, value])

for step in run:
    for task in step:
        for artifact in task.artifacts:
            if not artifact.id.startswith("_") and artifact.id not in ("metaflow_config", "config", "run_config"):
                walk(f"{{step.id}}.{{artifact.id}}", artifact.data)
ppo = run["ppo_train"].task
d = run.data
print(json.dumps({{"successful": run.successful, "paths": found, "stats": d.ppo_stats,
                  "resumed_from_step": d.ppo_resumed_from_step, "ppo_attempt": ppo.current_attempt,
                  "sft_merged_path": d.sft_merged_path, "reward_model_path": d.reward_model_path,
                  "prompts": d.datasets["prompts_train"]["uri"], "metaflow_config": d.metaflow_config,
                  "storage_root": d.storage_root, "eval_report": d.eval_report, "methods": d.methods,
                  "rlaif_status": d.rlaif_status, "rlaif_metrics": d.rlaif_metrics,
                  "preference_source": d.datasets["preference_train"]["source"],
                  "reward_metrics": {{k: v for k, v in d.reward_metrics.items() if k != "curves"}},
                  "gold_reward_metrics": {{k: v for k, v in d.gold_reward_metrics.items() if k != "curves"}},
                  "gold_reward_model_path": d.gold_reward_model_path, "gold_judge": d.gold_judge,
                  "statuses": {{m: getattr(d, m + "_status") for m in {methods}}},
                  "ppo_model_path": d.ppo_model_path}}))
"""


def client_view(env: dict, run_id: str) -> dict:
    """What the Client API shows of a run, read as that user (their datastore and metadata), in a subprocess."""
    code = CLIENT.format(root=str(ROOT), run_id=run_id, methods=methods.names())
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _reference_ppo(view: dict, cfg_path: Path, tmp: Path) -> list[dict]:
    """An uninterrupted PPO stage on the same inputs (downloaded from S3)."""
    from rlhf_lib import config, launch, storage

    cfg = config.load(cfg_path)
    scratch = tmp / "reference-inputs"
    result = launch.launch("ppo", cfg.to_json(), tmp / "reference", {
        "sft_model": storage.localize(view["sft_merged_path"], scratch),
        "reward_model": storage.localize(view["reward_model_path"], scratch),
        "prompts": storage.localize(view["prompts"], scratch)})
    return result["stats"]


def _assert_stats_equal(got: list[dict], expected: list[dict]) -> None:
    assert len(got) == len(expected) == SMALL["ppo"]["steps"]
    for a, b in zip(got, expected):
        for key, value in b.items():
            if isinstance(value, float):
                assert math.isclose(a[key], value, rel_tol=1e-4, abs_tol=1e-4), (a["step"], key, a[key], value)


def _assert_no_secret(bucket: str, roots: list[Path], log: str) -> None:
    secrets = [S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], WANDB_SECRET]
    for key, body in _objects(bucket).items():
        for secret in secrets:
            assert secret.encode() not in body, key
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                for secret in secrets:
                    assert secret.encode() not in path.read_bytes(), path
    for secret in secrets:
        assert secret not in log


@pytest.fixture(scope="module")
def s3_run(s3_endpoint, tmp_path_factory):
    """The compare flow (cut to CI's size) with AI feedback and a gold reward model, `run.storage_root = "s3://…"`,
    Metaflow's S3 datastore named in the user's ~/.metaflowconfig, every task attempt in a pod of its own (see the
    module doc). PPO is SIGKILLed after its 2nd checkpoint: Metaflow's @retry runs it again in a new pod, which
    must download that checkpoint from S3 (the first pod and its files are gone); SIGKILLed again after its 3rd,
    with the retries spent, the run fails. Every local scratch directory is then deleted and `resume ppo` runs
    from another directory."""
    tmp = tmp_path_factory.mktemp("s3run")
    home, env, bucket = s3_user(tmp, s3_endpoint)
    root = f"s3://{bucket}/explicit"
    cfg = write_config(tmp / "cfg.toml", {**SMALL, "run": {**SMALL["run"], "storage_root": root,
                                                           "methods": S3_METHODS}}, base=COMPARE)
    with s3_client_env(s3_endpoint):
        origin, returncode, log = _run_and_kill_ppo(
            [sys.executable, FLOW, "--config", "config", str(cfg), "--with", "podsim", "run", "--max-workers", "2"],
            env, bucket, "explicit", [(0, 2), (1, 3)], tmp, tmp / "run.log")
        assert returncode != 0, "killed twice with one retry, the run must fail"
        shutil.rmtree(tmp / "scratch", ignore_errors=True)
        elsewhere = tmp / "another-machine"
        elsewhere.mkdir()
        resume = subprocess.run([sys.executable, FLOW, "--with", "podsim", "resume", "ppo", "--origin-run-id", origin,
                                 "--max-workers", "2"], env=env, cwd=elsewhere, capture_output=True, text=True,
                                timeout=1500)
        resume_log = resume.stdout + resume.stderr
        (tmp / "resume.log").write_text(resume_log)
        assert resume.returncode == 0, resume_log[-4000:]
        resumed = re.search(r"Workflow starting \(run-id (\w+)\)", resume_log).group(1)
        view = client_view(env, resumed)
        reference = _reference_ppo(view, cfg, tmp)
    return {"tmp": tmp, "env": env, "log": log, "resume_log": resume_log, "origin": origin, "run_id": resumed,
            "view": view, "reference": reference, "bucket": bucket, "root": root, "endpoint": s3_endpoint,
            "home": home}


@contextlib.contextmanager
def s3_client_env(endpoint: str):
    """This process's environment pointed at the test S3 server (for boto3 here), restored afterwards."""
    values = {**S3_CREDENTIALS, "METAFLOW_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
def test_every_step_ran_in_its_own_pod_on_the_runs_own_code(s3_run):
    """Every task attempt in a pod of its own (chrooted, as root) importing rlhf_lib from the code package, never
    the image's decoy copy beside its working directory and on its PYTHONPATH."""
    text = s3_run["log"] + s3_run["resume_log"]
    pods = [line for line in text.splitlines() if "[podsim] step " in line]
    steps = {line[line.index("[podsim]"):].split()[2] for line in pods}
    assert set(STEPS) <= steps
    if os.geteuid() == 0:
        assert all("chrooted in its own mount namespace" in line for line in pods)
    imported = [line.split("[code] rlhf_lib imported from ")[1].strip() for line in text.splitlines()
                if "[code] rlhf_lib imported from " in line]
    assert len(imported) >= len(pods)
    assert all(path.startswith(str(s3_run["tmp"] / "pods")) and path.endswith("/image/metaflow/.mf_code/rlhf_lib")
               for path in imported), imported[:3]
    assert "the image's own copy of rlhf_lib was imported" not in text
    assert not re.search(r"\[live\] .* here failed", text)  # live cards write to the S3 datastore
    assert not list((s3_run["tmp"] / "pods").iterdir())  # every pod directory was deleted
    view = s3_run["view"]
    assert view["successful"]
    assert view["metaflow_config"].startswith("yours: METAFLOW_DEFAULT_DATASTORE=s3")  # env only, as a pod has it
    assert view["storage_root"] == s3_run["root"]
    assert f"[start] stage outputs and checkpoints: {s3_run['root']}" in s3_run["log"]


@pytest.mark.slow
def test_each_stage_shape_ai_feedback_and_the_gold_reward_model_ran(s3_run):
    view = s3_run["view"]
    assert view["statuses"] == {m: "done" if m in S3_METHODS else "skipped" for m in methods.names()}
    assert view["methods"] == S3_METHODS
    assert set(view["eval_report"]) == {"sft", *S3_METHODS}
    for online in [m for m in S3_METHODS if methods.get(m).snapshots]:  # every over-optimisation curve
        curve = view["eval_report"][online]["curve"]
        assert curve[0]["step"] == 0 and len(curve) >= 2 and "gold_win_rate" in curve[-1], online
    # AI feedback: the judge ranked SFT answers, dropped disagreeing orders, and both reward models trained on the
    # judged pairs, the proxy on one half and the gold one on the other.
    m = view["rlaif_metrics"]
    assert view["rlaif_status"] == "done" and view["preference_source"] == "ai_feedback"
    assert m["pairs_kept"] == m["train_pairs"] + m["eval_pairs"] and m["pairs_kept"] < m["pairs_sampled"]
    half = (m["train_pairs"] + 1) // 2
    assert view["reward_metrics"]["train_pairs"] == half
    assert view["gold_reward_metrics"]["train_pairs"] == m["train_pairs"] - half
    assert view["gold_judge"] == "reward_model" and view["gold_reward_model_path"] != view["reward_model_path"]


@pytest.mark.slow
def test_every_path_artifact_is_an_s3_uri_of_the_attempt_that_succeeded(s3_run):
    paths = s3_run["view"]["paths"]
    assert len(paths) > 15
    local = [(where, value) for where, value in paths if not value.startswith("s3://")]
    assert local == []
    # PPO: the resumed run's attempt 0 succeeded; its artifacts name that attempt's outputs.
    assert s3_run["view"]["ppo_model_path"] == f"{s3_run['root']}/RLHFFlow/{s3_run['run_id']}/ppo/attempt-0/merged"


@pytest.mark.slow
def test_every_stage_output_is_in_s3_and_none_on_the_local_disk(s3_run):
    with s3_client_env(s3_run["endpoint"]):
        stored = _objects(s3_run["bucket"])
    for run_id, stages in ((s3_run["origin"], ("data", "sft", "merge", "rlaif", "reward", "reward_gold")),
                           (s3_run["run_id"], ("ppo", "evaluate"))):
        for stage in stages:
            assert any(k.startswith(f"explicit/RLHFFlow/{run_id}/{stage}/attempt-") and k.endswith("/result.json")
                       for k in stored), (run_id, stage)
    # Nothing went to the profile's local default (artifacts) or to a directory named `s3:`.
    assert not (ROOT / "artifacts" / "RLHFFlow" / s3_run["origin"]).exists()
    assert not (ROOT / "s3:").exists()


@pytest.mark.slow
def test_killed_ppo_task_is_retried_from_what_its_first_attempt_stored_in_s3(s3_run):
    """The first attempt's pod and scratch are gone: the retry downloads the checkpoint from S3, and says which."""
    step = 2 * SMALL["ppo"]["save_freq"]
    first = f"{s3_run['root']}/RLHFFlow/{s3_run['origin']}/ppo/attempt-0/checkpoints/step-{step:06d}"
    assert f"downloading checkpoint {first}" in s3_run["log"]
    assert f"continuing from {first}" in s3_run["log"]
    assert f"resumed from step {step}" in s3_run["log"]


@pytest.mark.slow
def test_resume_on_a_clean_machine_continues_from_s3(s3_run):
    """Steps 1-6 from the first attempt, 7-9 from the retried one, 10-12 from `resume ppo` on a machine with no
    local file of the crashed run: together equal to an uninterrupted PPO, to 1e-4."""
    step = 3 * SMALL["ppo"]["save_freq"]
    second = f"{s3_run['root']}/RLHFFlow/{s3_run['origin']}/ppo/attempt-1/checkpoints/step-{step:06d}"
    assert f"downloading checkpoint {second}" in s3_run["resume_log"]
    assert f"resumed from step {step}" in s3_run["resume_log"]
    assert s3_run["view"]["resumed_from_step"] == step
    _assert_stats_equal(s3_run["view"]["stats"], s3_run["reference"])


@pytest.mark.slow
def test_the_storage_root_keeps_what_the_runs_artifacts_reference_and_the_origins_attempts(s3_run):
    """When the resumed run ends, every attempt its artifacts point into is there, and of the rest only the origin
    run's: PPO's two killed attempts stay (a run removes only its own attempts — another resume of the origin may
    still need them), and the resume recorded its ORIGIN. The cleanup command refuses to delete the origin while a
    run resumed from it exists."""
    from rlhf_lib import storage

    root, origin, resumed = s3_run["root"], s3_run["origin"], s3_run["run_id"]
    references = {value.rstrip("/") for _, value in s3_run["view"]["paths"] if value.startswith(root + "/")}
    with s3_client_env(s3_run["endpoint"]):
        files = storage.list_files(root)
    attempts = {"/".join(f.split("/")[:4]) for f in files  # RLHFFlow/<run>/<stage>/attempt-<k>/...
                if len(f.split("/")) > 4 and f.split("/")[3].startswith("attempt-")}
    others = {"/".join(f.split("/")[:4]) for f in files} - attempts
    assert others <= {f"RLHFFlow/{resumed}/ORIGIN", f"RLHFFlow/{origin}/ppo/READING"}, others
    assert f"RLHFFlow/{resumed}/ORIGIN" in others
    unreferenced = sorted(a for a in attempts if not any(r == f"{root}/{a}" or r.startswith(f"{root}/{a}/")
                                                         for r in references))
    assert unreferenced == [f"RLHFFlow/{origin}/ppo/attempt-0", f"RLHFFlow/{origin}/ppo/attempt-1"]
    assert f"[end] removed {root}/RLHFFlow/{origin}/" not in s3_run["resume_log"]
    refused = subprocess.run([sys.executable, "-m", "rlhf_lib.cleanup", origin, "--dry-run"], cwd=ROOT,
                             env={**s3_run["env"], "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode != 0 and f"run(s) {resumed} were resumed from it" in refused.stderr, refused.stderr


@pytest.mark.slow
def test_notebook_opens_the_s3_run(s3_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    for key in PROJECT_METAFLOW_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_run["env"].items():
        if key in ("HOME", "RLHF_SCRATCH_DIR") or key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("RLHF_RUN_ID", s3_run["run_id"])
    nb = nbformat.read(ROOT / "notebooks" / "inspect_run.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    text = json.dumps(nb)
    assert s3_run["run_id"] in text and s3_run["root"] in text
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.get("name") == "stdout")
    assert f"[storage] downloading {s3_run['root']}" in printed  # the model, from S3, on this machine
    assert any(line.startswith("Question: What is the capital of France?") for line in printed.splitlines())


@pytest.mark.slow
def test_no_secret_reaches_s3_metadata_or_logs(s3_run):
    with s3_client_env(s3_run["endpoint"]):
        _assert_no_secret(s3_run["bucket"], [s3_run["tmp"] / "metadata", s3_run["tmp"] / "another-machine"],
                          s3_run["log"] + s3_run["resume_log"])


def test_dockerfile_builds_the_image_the_cluster_guide_documents():
    """No Docker daemon here: check the Dockerfile's parts and that docs/cluster.md's commands use it."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "\nFROM nvidia/cuda:" in dockerfile and "runtime" in dockerfile
    assert 'pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in dockerfile
    assert "ARG TORCH_VERSION=2.13.0" in dockerfile and "download.pytorch.org/whl/cu" in dockerfile
    assert "pip install -r /opt/rlhf/requirements.txt" in dockerfile and "COPY rlhf_lib" in dockerfile
    guide = (ROOT / "docs" / "cluster.md").read_text()
    section = guide[guide.index("## Run on Kubernetes / AWS Batch / Argo"):]
    assert "docker build -t REGISTRY/rlhf-flow" in section and "METAFLOW_KUBERNETES_CONTAINER_IMAGE" in section
    assert "--with kubernetes argo-workflows create" in section and "--with batch" in section


# ------------------------------------------------------------------ an attempt given up for dead that keeps running

ZOMBIE = """
import json, sys
sys.path.insert(0, {root!r})
from rlhf_lib import config, pipeline
cfg = config.load({cfg!r})
result = pipeline.run_stage(cfg, "ppo", "77", json.loads({inputs!r}), attempt={attempt})
print("RESULT " + json.dumps(result))
"""


ZOMBIE_STEPS = 30


def _zombie_stage(s3_env, tiny_policy, tmp_path) -> tuple[str, str, Path]:
    """(the PPO stage's inputs as JSON, its S3 storage root, its config file): a tiny reward model and prompts."""
    from rlhf_lib import models
    from rlhf_lib.config import DatasetSource, TinyModelSpec
    from rlhf_lib.data import lake

    reward = models.prepare("tiny", TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, ffn_dim=64,
                                                  vocab_size=400, max_positions=128), "reward", tmp_path, seed=0)
    prompts = lake.materialise("prompts", DatasetSource(), "train", tmp_path, seed=0, sample_rows=80)["uri"]
    inputs = json.dumps({"sft_model": tiny_policy, "reward_model": reward, "prompts": prompts})
    root = f"s3://{s3_env['BUCKET']}/z"
    cfg = write_config(tmp_path / "cfg.toml", {
        "run": {"storage_root": root, "cpu_threads": 1, "wandb_mode": "disabled"},
        "ppo": {"steps": ZOMBIE_STEPS, "save_freq": 5, "keep_checkpoints": 2, "batch_size": 8, "mini_batch_size": 4,
                "ppo_epochs": 2, "min_response_length": 4, "max_response_length": 12, "stop_at_eos": False,
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}})
    return inputs, root, cfg


def _slow_checkpoint_reads(s3_env):
    """A proxy in front of the S3 server that delays each read of a checkpoint's files by a second."""
    from faulty_proxy import FaultyProxy

    upstream = s3_env["METAFLOW_S3_ENDPOINT_URL"].removeprefix("http://").split(":")
    return FaultyProxy(upstream[0], int(upstream[1]), delay=1.0,
                       match=lambda line: line.startswith(b"GET") and b"/checkpoints/step-" in line)


def _start_attempt(tmp_path: Path, code: str, attempt: int, endpoint: str | None = None) -> subprocess.Popen:
    """One attempt of the task on its own "machine" (scratch directory, lock), logging to attempt-N.log."""
    log = open(tmp_path / f"attempt-{attempt}.log", "w")
    env = {**os.environ, "RLHF_SCRATCH_DIR": str(tmp_path / f"machine-{attempt}"), "OMP_NUM_THREADS": "1"}
    if endpoint:
        env["METAFLOW_S3_ENDPOINT_URL"] = endpoint
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT)


def _complete_checkpoints(s3, bucket: str, prefix: str) -> list[int]:
    """The steps of the checkpoints under `prefix` that carry their COMPLETE marker."""
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return sorted(int(k.split("/step-")[1].split("/")[0]) for k in keys if k.endswith("/COMPLETE"))


@pytest.mark.slow
def test_an_attempt_given_up_for_dead_cannot_change_what_the_next_one_reads(s3_env, tiny_policy, tmp_path):
    """Attempt 0 of a PPO task stops answering (SIGSTOP: a partitioned or frozen pod Kubernetes gives up on) after
    its first checkpoint; attempt 1 starts on another machine and downloads that checkpoint (slowly: its S3 reads go
    through a proxy that delays them); while it downloads, attempt 0 comes back (SIGCONT) and goes on writing
    checkpoints — into its own prefix only, and deleting none now that attempt 1 has started and marked them as
    being read — and its own result. Attempt 1 ends with the stats of an uninterrupted run, and its result (what
    Metaflow records) names attempt 1's outputs."""
    import boto3

    inputs, root, cfg = _zombie_stage(s3_env, tiny_policy, tmp_path)
    slow = _slow_checkpoint_reads(s3_env)

    def start(attempt: int, endpoint: str | None = None):
        return _start_attempt(tmp_path, ZOMBIE.format(root=str(ROOT), cfg=str(cfg), inputs=inputs, attempt=attempt),
                              attempt, endpoint)

    s3 = boto3.client("s3", endpoint_url=s3_env["METAFLOW_S3_ENDPOINT_URL"], **_boto_credentials())
    prefix = "z/RLHFFlow/77/ppo"

    def complete(attempt: int) -> list[int]:
        return _complete_checkpoints(s3, s3_env["BUCKET"], f"{prefix}/attempt-{attempt}/checkpoints/")

    zombie = start(0)
    deadline = time.time() + 600
    while time.time() < deadline and not (5 in complete(0) and stage_process(zombie.pid, "ppo")):
        assert zombie.poll() is None, (tmp_path / "attempt-0.log").read_text()[-3000:]
        time.sleep(0.1)
    frozen = stage_process(zombie.pid, "ppo")
    frozen.send_signal(signal.SIGSTOP)
    successor = start(1, slow.url)
    while time.time() < deadline and "downloading checkpoint" not in (tmp_path / "attempt-1.log").read_text():
        assert successor.poll() is None, (tmp_path / "attempt-1.log").read_text()[-3000:]
        time.sleep(0.05)
    frozen.send_signal(signal.SIGCONT)  # the zombie is back while its successor downloads, and writes on
    assert "continuing from" not in (tmp_path / "attempt-1.log").read_text()
    assert successor.wait(timeout=900) == 0, (tmp_path / "attempt-1.log").read_text()[-3000:]
    assert zombie.wait(timeout=900) == 0, (tmp_path / "attempt-0.log").read_text()[-3000:]
    log0, log1 = (tmp_path / "attempt-0.log").read_text(), (tmp_path / "attempt-1.log").read_text()
    result0, result1 = (json.loads(log.split("RESULT ", 1)[1].splitlines()[0]) for log in (log0, log1))
    slow.close()
    adopted = result1["resumed_from_step"]
    assert adopted >= 5 and f"continuing from {root}/RLHFFlow/77/ppo/attempt-0/checkpoints/step-{adopted:06d}" in log1
    assert slow.matched > 0  # attempt 1's reads of the checkpoint went through the slow proxy
    # The checkpoint attempt 1 read is still there, and attempt 1 said it was reading it.
    assert adopted in complete(0)
    mark = s3.get_object(Bucket=s3_env["BUCKET"], Key=f"{prefix}/READING/RLHFFlow-77-ppo-attempt-1")["Body"].read()
    assert mark.decode().strip() == f"{root}/RLHFFlow/77/ppo/attempt-0/checkpoints/step-{adopted:06d}"
    # The zombie went on: checkpoints after the one attempt 1 took, and none pruned once attempt 1 had started.
    assert max(complete(0)) == ZOMBIE_STEPS and max(complete(0)) > adopted and len(complete(0)) > 2
    assert "a later attempt of this task has started: keeping every checkpoint" in log0
    # Each attempt's outputs are its own; what attempt 1 returns (Metaflow's artifacts) names attempt 1's.
    assert result1["model_path"] == f"{root}/RLHFFlow/77/ppo/attempt-1/merged"
    assert result0["model_path"] == f"{root}/RLHFFlow/77/ppo/attempt-0/merged"
    assert json.loads(s3.get_object(Bucket=s3_env["BUCKET"], Key=f"{prefix}/attempt-1/result.json")["Body"].read()
                      ) == result1
    # Attempt 1 ends exactly where an uninterrupted run ends: the zombie is one.
    assert len(result1["stats"]) == len(result0["stats"]) == ZOMBIE_STEPS
    from test_resume_faults import _assert_same_stats  # the resumed-run comparison, one definition

    _assert_same_stats(result1["stats"], result0["stats"])
