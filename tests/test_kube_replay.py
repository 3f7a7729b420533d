"""The first real cluster run, run here: every step up to a two-node PPO gang is submitted by Metaflow's own
`kubernetes step` code to a recorder of the Kubernetes API (tests/kube_recorder.py), and each recorded Job and
JobSet is then run as Kubernetes would run it — every pod's command, arguments and environment exactly as
recorded — in simulated pods (tests/kube_replay.py), which replace only what a cluster's machinery provides (the
image's paths, the kubelet's field values, cluster DNS → 127.0.0.1, credentials). The gang's two pods find each
other through what the JobSet told them (MF_MASTER_ADDR, MF_MASTER_PORT, MF_WORLD_SIZE) and train PPO at tiny
size to the end. What only a real cluster shows — the JobSet controller's scheduling and failure policy, image
pulls, credentials, NCCL — is in docs/cluster.md."""

import json
import os

import pytest

from conftest import S3_CREDENTIALS, _free_port, write_config
from kube_recorder import KubeRecorder
from kube_replay import run_pods
from test_kubernetes import kube_commands, submission_env, submit

pytestmark = pytest.mark.slow  # a tiny run up to PPO, step by step in pods

# The route to the gang: every step whose outputs ppo_gang_train reads.
TO_THE_GANG = ("start", "data", "sft", "merge", "rlaif", "reward", "ppo", "ppo_gang", "ppo_gang_train")
STEPS, BATCH = 3, 8


def _checked(step: str, results: list) -> list:
    failed = [(name, code, log[-4000:]) for name, code, log in results if code != 0]
    assert not failed, f"{step}: pods failed: {failed}"
    return results


@pytest.fixture(scope="module")
def replayed(s3_endpoint, tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the simulated pods need a mount namespace of their own (root): their own /etc/hosts")
    tmp = tmp_path_factory.mktemp("replay")
    (tmp / "pods").mkdir()
    recorder = KubeRecorder()
    env = submission_env(tmp, s3_endpoint, recorder)
    port = _free_port()
    cfg = write_config(tmp / "replay.toml", {
        "run": {"methods": ["ppo"], "nodes": 2, "cpu_threads": 1, "master_port": port},
        "policy": {"tiny": {"pretrain_steps": 20}}, "eval": {"num_prompts": 8, "curve": False},
        "sft": {"max_steps": 5, "save_steps": 5}, "reward": {"max_steps": 10, "save_steps": 10},
        "ppo": {"steps": STEPS, "save_freq": STEPS, "batch_size": 2 * BATCH, "mini_batch_size": 4}})
    commands = kube_commands(cfg, env, tmp / "commands.json", 2)
    secrets = {"credentials": S3_CREDENTIALS}
    offline = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}  # stands in for the cluster's network reach
    # To see the replay fail when the recorded environment is wrong (docs/cluster.md): e.g.
    # RLHF_REPLAY_ALTER='{"worker-0-0": {"MF_MASTER_PORT": "1234"}}' RLHF_REPLAY_TIMEOUT=120 (pod-name suffix: env).
    alter = json.loads(os.environ.get("RLHF_REPLAY_ALTER", "{}"))
    timeout = float(os.environ.get("RLHF_REPLAY_TIMEOUT", "900"))
    bodies, logs = {}, {}
    try:
        for step in TO_THE_GANG:
            before = len(recorder.created)
            submitted = submit(commands[step], env)
            created = recorder.created[before:]
            assert len(created) == 1, (step, submitted.stderr[-3000:])
            bodies[step] = created[0]["body"]
            logs[step] = _checked(step, run_pods(bodies[step], secrets, tmp / "pods", offline, timeout=timeout,
                                                 alter=alter if step == "ppo_gang_train" else None))
    finally:
        recorder.close()
    return {"bodies": bodies, "logs": logs, "port": port, "run_id": commands["start"]["env"]["METAFLOW_RUN_ID"],
            "bucket": env["METAFLOW_DATASTORE_SYSROOT_S3"].split("/")[2], "endpoint": s3_endpoint}


def test_the_recorded_gang_trains_ppo_to_the_end_in_its_pods(replayed):
    """Both pods of the recorded JobSet ran: rank 0 on the control pod, rank 1 on the worker, rendezvous at the
    port the config named; node 0 stored the stage's result with every step's stats from both ranks."""
    import boto3

    jobset = replayed["bodies"]["ppo_gang_train"]
    assert jobset["kind"] == "JobSet"
    (control, _, control_log), (worker, _, worker_log) = replayed["logs"]["ppo_gang_train"]
    assert "-control-" in control and "-worker-" in worker
    assert f"[ppo] rank 0/2: prompts [0, {BATCH})" in control_log
    assert f"[ppo] rank 1/2: prompts [{BATCH}, {2 * BATCH})" in worker_log
    assert f"--master_port {replayed['port']}" in control_log
    s3 = boto3.client("s3", endpoint_url=replayed["endpoint"], aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    key = f"metaflow/rlhf/RLHFFlow/{replayed['run_id']}/ppo/attempt-0/result.json"
    result = json.loads(s3.get_object(Bucket=replayed["bucket"], Key=key)["Body"].read())
    assert len(result["stats"]) == STEPS and all(s["samples"] == 2 * BATCH for s in result["stats"])
    assert result["metrics"]["ranks"] == 2


def test_every_pod_ran_the_runs_own_code_in_a_pod_of_its_own(replayed):
    """Each step's pod downloaded the code package the submission named and ran the step from it (the decoy copy
    of rlhf_lib in the image directory was never imported)."""
    for step, results in replayed["logs"].items():
        for name, code, log in results:
            assert "Code package downloaded." in log, (step, name, log[-2000:])
            assert "the image's own copy of rlhf_lib was imported" not in log
