"""`run --with kubernetes` reaches every pod: for each step of a run's route, the command Metaflow's runtime would
launch (built by Metaflow's own NativeRuntime, CLIArgs and step decorators: tests/podsim's `kube-commands`) is run —
the real `kubernetes step ...`, Metaflow's own submission code — up to the Kubernetes API call, against a recorder
of that API (tests/kube_recorder.py), not a cluster: nothing is scheduled or run. configs/opt-1.3b.toml with its
GPU steps on a GPU node pool, on one node and on two."""

import json
import os
import subprocess
import sys
import tomllib
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT, S3_CREDENTIALS, one_node_steps, write_config
from kube_recorder import KubeRecorder

GPU_POOL = {"node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
RECIPE = tomllib.loads((ROOT / "configs" / "opt-1.3b.toml").read_text())
KINDS = {"data": "light", "sft": "train", "merge": "infer", "reward": "train", "ppo_train": "train",
         "ppo_gang_train": "train", "evaluate": "infer"}
IDLE = ("rlaif", "dpo", "rest", "grpo", "rloo")  # nothing to do with PPO alone and human preference pairs
ROUTING = ("start", "ppo", "ppo_gang", "ppo_gang_join", "ppo_join", "end")


def submission_env(tmp, s3_endpoint: str, recorder: KubeRecorder) -> dict:
    """A user's environment for `--with kubernetes`: a new bucket as Metaflow's S3 datastore, local metadata, the
    recorder as the cluster (KUBECONFIG), tests/podsim on PYTHONPATH (for `kube-commands`)."""
    import boto3

    bucket = f"rlhf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1"
                 ).create_bucket(Bucket=bucket)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RLHF_METAFLOW_CONFIG", "METAFLOW_HOME", "METAFLOW_DATASTORE_SYSROOT_LOCAL", "PYTHONPATH")}
    env.update(S3_CREDENTIALS, METAFLOW_S3_ENDPOINT_URL=s3_endpoint, METAFLOW_DEFAULT_DATASTORE="s3",
               METAFLOW_DATASTORE_SYSROOT_S3=f"s3://{bucket}/metaflow", METAFLOW_DEFAULT_METADATA="local",
               METAFLOW_DATASTORE_SYSROOT_LOCAL=str(tmp / "metadata"), METAFLOW_KUBERNETES_NAMESPACE="rlhf",
               METAFLOW_KUBERNETES_CONTAINER_IMAGE="rlhf-flow:test", HOME=str(tmp),
               PYTHONPATH=str(ROOT / "tests" / "podsim"), KUBECONFIG=recorder.kubeconfig(tmp / "kubeconfig", "rlhf"))
    return env


def kube_commands(cfg, env: dict, out, nodes: int) -> dict:
    """{step: {"args", "env"}}: the command Metaflow's runtime would launch for each step of the route."""
    made = subprocess.run([sys.executable, "flows/rlhf_flow.py", "--config", "config", str(cfg), "--with",
                           "kubernetes", "kube-commands", str(out), "--num-parallel", str(nodes)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    return json.loads(out.read_text())


def submit(command: dict, env: dict) -> subprocess.CompletedProcess:
    """The real `kubernetes step ...` of a step, up to its API call (the recorder refuses the status reads)."""
    return subprocess.run(command["args"], cwd=ROOT, env={**env, **command["env"]}, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def submissions(s3_endpoint, tmp_path_factory):
    """{nodes: {step: the Job or JobSet Metaflow submitted for it}} for run.nodes 1 and 2."""
    tmp = tmp_path_factory.mktemp("kubernetes")
    recorder = KubeRecorder()
    env = submission_env(tmp, s3_endpoint, recorder)
    found = {}
    try:
        for nodes in (1, 2):
            cfg = write_config(tmp / f"recipe-{nodes}.toml", {
                **RECIPE, "run": {**RECIPE["run"], "nodes": nodes},
                "resources": {**RECIPE["resources"], "train": {**RECIPE["resources"]["train"], **GPU_POOL},
                              "infer": {**RECIPE["resources"]["infer"], **GPU_POOL}}}, base=ROOT / "configs" /
                "opt-1.3b.toml")
            commands = kube_commands(cfg, env, tmp / f"commands-{nodes}.json", nodes)
            before = len(recorder.created)
            with ThreadPoolExecutor(4) as pool:
                results = dict(pool.map(lambda step: (step, submit(commands[step], env)), commands))
            created = {o["body"]["metadata"]["annotations"]["metaflow/step_name"]: o
                       for o in recorder.created[before:]}
            found[nodes] = {"commands": commands, "created": created,
                            "stderr": {s: r.stderr[-2000:] for s, r in results.items()}}
    finally:
        recorder.close()
    return found


def _pods(obj: dict) -> list[dict]:
    """The pod specs of a Job, or of every replicated job of a JobSet."""
    body = obj["body"]
    if body["kind"] == "Job":
        return [body["spec"]["template"]["spec"]]
    return [job["template"]["spec"]["template"]["spec"] for job in body["spec"]["replicatedJobs"]]


def _asks(pod: dict) -> dict:
    container = pod["containers"][0]
    requests, limits = container["resources"]["requests"], container["resources"].get("limits", {})
    shm = [v["emptyDir"]["sizeLimit"] for v in pod.get("volumes") or [] if v.get("emptyDir", {}).get("medium") ==
           "Memory" and v["emptyDir"].get("sizeLimit")]
    return {"gpu": int(limits.get("nvidia.com/gpu", 0)), "cpu": float(requests["cpu"]),
            "memory_mb": float(str(requests["memory"]).rstrip("M")),
            "disk_mb": float(str(requests["ephemeral-storage"]).rstrip("M")),
            "shared_memory_mb": float(shm[0].rstrip("Mi")) if shm else None,
            "node_selector": pod.get("nodeSelector") or {}, "tolerations": pod.get("tolerations") or []}


@pytest.mark.parametrize("nodes", [1, 2])
def test_every_step_of_the_recipe_reaches_submission(submissions, nodes):
    """Each step on the run's route is submitted (a Job; the gang's a JobSet), none refused before the API call —
    PPO on one node included (Metaflow's Kubernetes plugin refuses a @parallel gang of one)."""
    done = submissions[nodes]
    route = set(done["commands"])
    gang = {"ppo_gang", "ppo_gang_train", "ppo_gang_join"}
    assert {"start", "ppo", "ppo_train", "dpo", "evaluate", "end"} <= one_node_steps()  # the registry's, derived
    assert route == (one_node_steps() - (set() if nodes == 1 else {"ppo_train"}) | (gang if nodes > 1 else set()))
    assert all(c["args"][c["args"].index("kubernetes") + 1] == "step" for c in done["commands"].values())
    assert set(done["created"]) == route, {s: e for s, e in done["stderr"].items() if s not in done["created"]}
    for step, obj in done["created"].items():
        assert obj["body"]["kind"] == ("JobSet" if step == "ppo_gang_train" else "Job"), step
        assert "not supported" not in done["stderr"][step]


@pytest.mark.parametrize("nodes", [1, 2])
def test_each_step_asks_what_its_kind_needs_on_the_right_nodes(submissions, nodes):
    """GPUs, CPU, memory, shared memory, disk of each step's kind; the GPU pool's node selector and tolerations on
    the GPU steps alone; the least Kubernetes takes for the steps with nothing to do."""
    created = submissions[nodes]["created"]
    gpus = {"train": RECIPE["run"]["gpus"], "infer": 1, "light": 0}
    for step, kind in KINDS.items():
        if step not in created:
            continue
        want = RECIPE["resources"][kind]
        placement = GPU_POOL if kind != "light" else {"node_selector": {}, "tolerations": []}
        for pod in _pods(created[step]):
            got = _asks(pod)
            assert {k: got[k] for k in ("gpu", "cpu", "memory_mb", "disk_mb", "shared_memory_mb")} == {
                "gpu": gpus[kind], "cpu": want["cpu"], "memory_mb": want["memory_mb"], "disk_mb": want["disk_mb"],
                "shared_memory_mb": want["shared_memory_mb"]}, step
            assert got["node_selector"] == placement["node_selector"], step
            assert [t for t in got["tolerations"] if t.get("key") == "nvidia.com/gpu"] == placement["tolerations"]
    for step in IDLE + tuple(s for s in ROUTING if s in created):
        got = _asks(_pods(created[step])[0])
        assert got["gpu"] == 0 and got["node_selector"] == {} and not got["tolerations"], step
    for step in IDLE:  # Metaflow's floor: its @kubernetes keeps the larger of @resources and its defaults
        got = _asks(_pods(created[step])[0])
        assert (got["cpu"], got["memory_mb"], got["disk_mb"]) == (1.0, 4096.0, 10240.0), step


def test_the_gang_is_a_jobset_of_run_nodes_pods(submissions):
    jobset = submissions[2]["created"]["ppo_gang_train"]["body"]
    replicas = sum(job.get("replicas", 1) * job["template"]["spec"].get("parallelism", 1)
                   for job in jobset["spec"]["replicatedJobs"])
    assert replicas == 2


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def test_the_gangs_pods_are_told_a_port_the_world_size_and_the_control_pod(submissions):
    """What each node of the gang reads at launch (launch.Nodes.of): a numeric MF_MASTER_PORT, the one the config
    names (Metaflow writes the string "None" when the step declares none, and every node then dies at launch)."""
    jobset = submissions[2]["created"]["ppo_gang_train"]["body"]
    for job in jobset["spec"]["replicatedJobs"]:
        env = _env(job["template"]["spec"]["template"]["spec"]["containers"][0])
        assert env["MF_MASTER_PORT"] == str(RECIPE["run"].get("master_port", 29500)), job["name"]
        assert env["MF_WORLD_SIZE"] == "2" and env["MF_MASTER_ADDR"].startswith(jobset["metadata"]["name"])


# The JobSet API's fields, as its reference publishes them (jobset.x-k8s.io/v1alpha2, kubernetes-sigs/jobset's
# "JobSet API" page): the Kubernetes client has no model for a JobSet, so its own fields are held to these names,
# and everything inside that is Kubernetes' own (metadata, each replicated Job's template) to the client's models.
JOBSET_FIELDS = {"apiVersion", "kind", "metadata", "spec", "status"}
JOBSET_SPEC_FIELDS = {"replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy", "suspend",
                      "coordinator", "managedBy", "ttlSecondsAfterFinished"}
REPLICATED_JOB_FIELDS = {"name", "groupName", "template", "replicas", "dependsOn"}
STARTUP_POLICY = {"startupPolicyOrder": {"AnyOrder", "InOrder"}}


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def _round_trip(body: dict, model: str) -> dict:
    """`body` read into the Kubernetes client's model, and written out again."""
    from kubernetes.client import ApiClient

    api = ApiClient()
    return api.sanitize_for_serialization(api.deserialize(json.dumps(body), model, "application/json"))


def test_the_recorded_objects_are_what_the_kubernetes_api_takes(submissions):
    """Every Job reads into the client's V1Job and back without losing a field; the JobSet has only the fields its
    published API has, and its metadata and each replicated Job's template read into the client's models."""
    for nodes in (1, 2):
        for step, created in submissions[nodes]["created"].items():
            body = created["body"]
            if body["kind"] == "Job":
                assert _round_trip(body, "V1Job") == _without_none(body), step
                continue
            assert body["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and set(body) <= JOBSET_FIELDS, step
            assert _round_trip(body["metadata"], "V1ObjectMeta") == _without_none(body["metadata"])
            spec = _without_none(body["spec"])
            assert set(spec) <= JOBSET_SPEC_FIELDS, set(spec) - JOBSET_SPEC_FIELDS
            for key, allowed in STARTUP_POLICY.items():
                assert spec.get("startupPolicy", {}).get(key, next(iter(allowed))) in allowed
            for job in spec["replicatedJobs"]:
                assert set(job) <= REPLICATED_JOB_FIELDS, set(job) - REPLICATED_JOB_FIELDS
                assert _round_trip(job["template"], "V1JobTemplateSpec") == job["template"], job["name"]
