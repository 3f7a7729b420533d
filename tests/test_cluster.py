"""On a cluster: the code package, the Argo compile, the user's Metaflow config, and — against a real S3 server —
the flow run step by step as pods would run it, a preempted PPO task retried in the same run, and `resume ppo`
on a machine with none of the crashed run's local files.

Pods are simulated by `tests/podsim` (`--with podsim`): each task attempt runs in a new empty directory holding
only the code package downloaded from the S3 datastore, deleted when the step ends.
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
from pathlib import Path

import pytest

from conftest import ROOT, S3_CREDENTIALS, stage_process, write_config

FLOW = str(ROOT / "flows" / "rlhf_flow.py")
PODSIM = str(ROOT / "tests" / "podsim")
# What the project sets for itself when the user has no Metaflow config: a "user" must not inherit it.
PROJECT_METAFLOW_VARS = ("RLHF_METAFLOW_CONFIG", "METAFLOW_HOME", "METAFLOW_DATASTORE_SYSROOT_LOCAL",
                         "METAFLOW_DEFAULT_DATASTORE", "METAFLOW_DEFAULT_METADATA")
WANDB_SECRET = "wandb-key-do-not-store-0123456789"
# Small enough for CI, long enough to kill PPO after its second checkpoint with steps still to go.
SMALL = {"run": {"methods": ["ppo"], "cpu_threads": 2}, "policy": {"tiny": {"pretrain_steps": 20}},
         "eval": {"num_prompts": 16}, "sft": {"max_steps": 10, "save_steps": 5},
         "reward": {"max_steps": 20, "save_steps": 10}, "ppo": {"steps": 12, "save_freq": 3}}


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


def test_argo_workflow_asks_each_step_for_what_it_uses(s3_env, tmp_path):
    """configs/opt-1.3b.toml (PPO only, 8 GPUs): GPUs only where a stage uses them, and each kind of step the
    CPU, memory, shared memory and disk of its [resources] entry."""
    from rlhf_lib import config

    cfg = config.load(ROOT / "configs" / "opt-1.3b.toml")
    assert cfg.run.methods == ["ppo"] and cfg.run.gpus == 8
    templates = _argo_templates(ROOT / "configs" / "opt-1.3b.toml", s3_env, tmp_path)
    expected_gpus = {"data": 0, "sft": 8, "merge": 1, "rlaif": 0, "reward": 8, "dpo": 0, "rest": 0, "grpo": 0,
                     "rloo": 0, "evaluate": 1}
    kinds = {"data": "light", "sft": "train", "merge": "infer", "rlaif": "light", "reward": "train",
             "dpo": "light", "rest": "light", "grpo": "light", "rloo": "light", "evaluate": "infer"}
    for step, gpus in expected_gpus.items():
        got = _requests(templates[step])
        want = getattr(cfg.resources, kinds[step])
        assert got == {"gpu": gpus, "cpu": want.cpu, "memory_mb": want.memory_mb, "disk_mb": want.disk_mb,
                       "shared_memory_mb": want.shared_memory_mb}, step
    # The PPO gang (one node here) is a JobSet whose pods ask the train kind's resources and run.gpus GPUs.
    manifest = templates["ppo-train"]["resource"]["manifest"]
    assert "kind: JobSet" in manifest and "nvidia.com/gpu: '8'" in manifest
    assert f"cpu={cfg.resources.train.cpu:.1f}" in manifest and f"disk={cfg.resources.train.disk_mb:.1f}" in manifest
    assert f"shared_memory={cfg.resources.train.shared_memory_mb}" in manifest
    for step in ("start", "ppo", "ppo-join", "end"):  # routing steps ask for nothing special
        assert _requests(templates[step])["gpu"] == 0, step
    assert "rlhf_lib" not in json.dumps(templates["sft"]["container"]["env"])  # the code comes in the package


def test_argo_gang_spans_run_nodes_and_ai_feedback_puts_rlaif_on_a_gpu(s3_env, tmp_path):
    cfg = write_config(tmp_path / "cfg.toml", {"run": {"gpus": 2, "nodes": 3, "methods": ["ppo", "grpo"]},
                                                "data": {"preference": {"source": "ai_feedback"}}})
    templates = _argo_templates(cfg, s3_env, tmp_path)
    assert _requests(templates["rlaif"])["gpu"] == 1 and _requests(templates["grpo"])["gpu"] == 2
    assert _requests(templates["dpo"])["gpu"] == 0
    manifest = templates["ppo-train"]["resource"]["manifest"]
    # run.nodes reaches the JobSet at run time: `ppo` fans out to num_parallel = run.nodes workers.
    assert "kind: JobSet" in manifest and "nvidia.com/gpu: '2'" in manifest and "workerCount" in manifest


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


def _run_and_kill_ppo(cmd: list[str], env: dict, bucket: str, prefix: str, kill_after: list[int],
                      cwd: Path, log_path: Path) -> tuple[str, int, str]:
    """Run the flow; SIGKILL its PPO subprocess each time the next checkpoint in `kill_after` (counted in
    checkpoints) is complete in S3 under s3://bucket/prefix/RLHFFlow/<run id>/ppo/checkpoints.
    Returns (run id, exit code, log)."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=os.environ["METAFLOW_S3_ENDPOINT_URL"], **_boto_credentials())
    targets = [f"ppo/checkpoints/step-{n * SMALL['ppo']['save_freq']:06d}/COMPLETE" for n in kill_after]
    run_id, deadline = None, time.time() + 900
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
        proc.wait(timeout=900)
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
                  "storage_root": d.storage_root, "eval_report": d.eval_report}}))
"""


def client_view(env: dict, run_id: str) -> dict:
    """What the Client API shows of a run, read as that user (their datastore and metadata), in a subprocess."""
    proc = subprocess.run([sys.executable, "-c", CLIENT.format(root=str(ROOT), run_id=run_id)], env=env,
                          capture_output=True, text=True, timeout=300)
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
    """The default flow (small) with `run.storage_root = "s3://…"` and Metaflow's S3 datastore named in the
    user's ~/.metaflowconfig, every step in a fresh pod. PPO is SIGKILLed after its 2nd checkpoint: Metaflow's
    @retry continues it from S3 in the same run; SIGKILLed again after its 3rd, with the retries spent, the run
    fails. Every local scratch directory is then deleted and `resume ppo` runs from another directory."""
    tmp = tmp_path_factory.mktemp("s3run")
    home, env, bucket = s3_user(tmp, s3_endpoint)
    root = f"s3://{bucket}/explicit"
    cfg = write_config(tmp / "cfg.toml", {**SMALL, "run": {**SMALL["run"], "retries": 1, "storage_root": root}})
    with s3_client_env(s3_endpoint):
        origin, returncode, log = _run_and_kill_ppo(
            [sys.executable, FLOW, "--config", "config", str(cfg), "--with", "podsim", "run"], env, bucket,
            "explicit", [2, 3], tmp, tmp / "run.log")
        assert returncode != 0, "killed twice with one retry, the run must fail"
        shutil.rmtree(tmp / "scratch")
        elsewhere = tmp / "another-machine"
        elsewhere.mkdir()
        resume = subprocess.run([sys.executable, FLOW, "--with", "podsim", "resume", "ppo", "--origin-run-id", origin],
                                env=env, cwd=elsewhere, capture_output=True, text=True, timeout=900)
        resume_log = resume.stdout + resume.stderr
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
def test_every_step_ran_in_its_own_fresh_pod(s3_run):
    steps = {line[line.index("[podsim]"):].split()[2] for line in (s3_run["log"] + s3_run["resume_log"]).splitlines()
             if "[podsim] step " in line}
    assert {"start", "data", "sft", "merge", "rlaif", "reward", "ppo", "ppo_train", "ppo_join", "evaluate",
            "end"} <= steps
    assert not list((s3_run["tmp"] / "pods").iterdir())  # every pod directory was deleted
    view = s3_run["view"]
    assert view["successful"]
    assert view["metaflow_config"] == f"yours: {s3_run['home'] / '.metaflowconfig' / 'config.json'}"
    assert view["storage_root"] == s3_run["root"]
    assert f"[start] stage outputs and checkpoints: {s3_run['root']}" in s3_run["log"]


@pytest.mark.slow
def test_every_path_artifact_is_an_s3_uri(s3_run):
    paths = s3_run["view"]["paths"]
    assert len(paths) > 15
    local = [(where, value) for where, value in paths if not value.startswith("s3://")]
    assert local == []


@pytest.mark.slow
def test_every_stage_output_is_in_s3_and_none_on_the_local_disk(s3_run):
    with s3_client_env(s3_run["endpoint"]):
        stored = _objects(s3_run["bucket"])
    for run_id, stages in ((s3_run["origin"], ("data", "sft", "merge", "reward")),
                           (s3_run["run_id"], ("ppo", "evaluate"))):
        for stage in stages:
            assert f"explicit/RLHFFlow/{run_id}/{stage}/result.json" in stored, (run_id, stage)
    # Nothing went to the profile's local default (artifacts/test) or to a directory named `s3:`.
    assert not (ROOT / "artifacts" / "test" / "RLHFFlow" / s3_run["origin"]).exists()
    assert not (ROOT / "s3:").exists()


@pytest.mark.slow
def test_killed_ppo_task_is_retried_from_its_own_checkpoint(s3_run):
    step = 2 * SMALL["ppo"]["save_freq"]
    assert f"an earlier attempt of this task stored step-{step:06d} in {s3_run['root']}" in s3_run["log"]
    assert f"resumed from step {step}" in s3_run["log"]


@pytest.mark.slow
def test_resume_on_a_clean_machine_continues_from_s3(s3_run):
    """Steps 1-6 from the first attempt, 7-9 from the retried one, 10-12 from `resume ppo` on a machine with no
    local file of the crashed run: together equal to an uninterrupted PPO, to 1e-4."""
    step = 3 * SMALL["ppo"]["save_freq"]
    origin_ckpts = f"{s3_run['root']}/RLHFFlow/{s3_run['origin']}/ppo/checkpoints"
    assert f"left step-{step:06d} in {origin_ckpts}" in s3_run["resume_log"]
    assert f"resumed from step {step}" in s3_run["resume_log"]
    assert s3_run["view"]["resumed_from_step"] == step
    _assert_stats_equal(s3_run["view"]["stats"], s3_run["reference"])


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
    assert printed.startswith("Question: What is the capital of France?")


@pytest.mark.slow
def test_no_secret_reaches_s3_metadata_or_logs(s3_run):
    with s3_client_env(s3_run["endpoint"]):
        _assert_no_secret(s3_run["bucket"], [s3_run["tmp"] / "metadata", s3_run["tmp"] / "another-machine"],
                          s3_run["log"] + s3_run["resume_log"])


def test_dockerfile_builds_the_image_the_readme_documents():
    """No Docker daemon here: check the Dockerfile's parts and that the README's commands use it."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "\nFROM nvidia/cuda:" in dockerfile and "runtime" in dockerfile
    assert 'pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"' in dockerfile
    assert "ARG TORCH_VERSION=2.13.0" in dockerfile and "download.pytorch.org/whl/cu" in dockerfile
    assert "pip install -r /opt/rlhf/requirements.txt" in dockerfile and "COPY rlhf_lib" in dockerfile
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run on Kubernetes / AWS Batch / Argo"):]
    assert "docker build -t REGISTRY/rlhf-flow" in section and "METAFLOW_KUBERNETES_CONTAINER_IMAGE" in section
    assert "--with kubernetes argo-workflows create" in section and "--with batch" in section
