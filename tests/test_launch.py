"""Stage subprocesses: a failure raises StageFailed with the tail of the stage's own log."""

import json

import pytest

from rlhf_lib import config, launch, machine
from conftest import ROOT, TEST_CONFIG


def test_failed_stage_raises_with_log_tail(tmp_path):
    cfg = config.load(TEST_CONFIG)
    with pytest.raises(launch.StageFailed) as info:
        launch.launch("merge", cfg.to_json(), tmp_path / "merge", {"base_model": str(tmp_path / "nowhere")})
    err = info.value
    assert err.returncode != 0
    assert "missing --input adapter=PATH" in err.log_tail  # the stage's own message, carried up
    assert (tmp_path / "merge" / "stage.log").exists()
    assert not (tmp_path / "merge" / "result.json").exists()


def test_one_process_runs_plainly_and_several_under_accelerate():
    import sys

    for gpus in (0, 1):  # one process: no launcher, accelerate's settings in its environment instead
        cmd = launch.stage_command("sft", ["--config", "x"], num_gpus=gpus)
        assert cmd == [sys.executable, "-m", "rlhf_lib.stages.sft", "--config", "x"]
    assert launch.single_process_env(0)["ACCELERATE_USE_CPU"] == "true"
    assert launch.single_process_env(1)["ACCELERATE_MIXED_PRECISION"] == "no"  # the stage's plan decides
    cmd = launch.stage_command("sft", ["--config", "x"], num_gpus=8)
    assert "accelerate.commands.launch" in cmd and cmd[cmd.index("--num_processes") + 1] == "8"
    assert "--multi_gpu" in cmd and cmd[cmd.index("--mixed_precision") + 1] == "no"


def test_stage_runs_alone_and_writes_result(tiny_policy, tmp_path):
    """A stage is an entry point of its own: merge a (zero) adapter without Metaflow or accelerate."""
    from peft import get_peft_model

    from rlhf_lib import models
    from rlhf_lib.config import LoraSection
    from rlhf_lib.stages import merge

    get_peft_model(models.load_causal_lm(tiny_policy), models.lora_config(LoraSection(r=2, alpha=4))
                   ).save_pretrained(tmp_path / "adapter")
    (tmp_path / "run.json").write_text(config.load(TEST_CONFIG).to_json())
    merge.main(["--config", str(tmp_path / "run.json"), "--output", str(tmp_path / "out"),
                "--input", f"base_model={tiny_policy}", "--input", f"adapter={tmp_path / 'adapter'}"])
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["stage"] == "merge" and "torch" in result["versions"]
    assert (tmp_path / "out" / "merged" / "model.safetensors").exists()


def test_model_only_stages_run_once_on_one_gpu():
    """merge, rlaif and evaluate do no gradient sync: one process on one GPU, not one per GPU doing the same."""
    for stage in ("merge", "rlaif", "evaluate"):
        cmd = launch.stage_command(stage, [], num_gpus=8)
        assert "accelerate.commands.launch" not in cmd and cmd[1:3] == ["-m", f"rlhf_lib.stages.{stage}"], stage


def test_multi_node_commands():
    nodes = launch.Nodes(count=2, index=1, main_ip="10.0.0.5", port=29400)
    cpu = launch.stage_command("ppo", ["--x"], num_gpus=0, nodes=nodes)
    assert cpu[1:3] == ["-m", "torch.distributed.run"]
    assert cpu[cpu.index("--nnodes") + 1] == "2" and cpu[cpu.index("--node_rank") + 1] == "1"
    assert cpu[cpu.index("--master_addr") + 1] == "10.0.0.5" and cpu[-2:] == ["rlhf_lib.stages.ppo", "--x"]
    gpu = launch.stage_command("ppo", [], num_gpus=4, nodes=nodes)
    assert gpu[gpu.index("--num_processes") + 1] == "8" and gpu[gpu.index("--machine_rank") + 1] == "1"
    assert gpu[gpu.index("--main_process_ip") + 1] == "10.0.0.5"
    # Every node derives the same rendezvous port from the run id.
    from types import SimpleNamespace

    node = SimpleNamespace(num_nodes=2, node_index=0, main_ip="127.0.0.1")
    assert launch.Nodes.of(node, "123", {}).port == launch.Nodes.of(node, "123", {}).port != \
        launch.Nodes.of(node, "124", {}).port
    # Where Metaflow opened a port for the gang (a Kubernetes JobSet: @kubernetes(port=...)), that one.
    assert launch.Nodes.of(node, "123", {"MF_MASTER_PORT": "3339"}).port == 3339
    # What Metaflow writes into a JobSet whose gang step declared no port: a loud error naming the key, not int().
    with pytest.raises(launch.MachineUnfit, match="'None', not a port.*run.master_port"):
        launch.Nodes.of(node, "123", {"MF_MASTER_PORT": "None"})


def test_run_gpus_0_hides_every_gpu_from_the_stage(tmp_path):
    """run.gpus = 0 keeps a stage on the CPU even on a machine with GPUs: the launcher hides them."""
    cfg = config.load(TEST_CONFIG)
    env = {"PYTHONPATH": str(ROOT / "tests")}
    cpu = launch.launch("probe", cfg.to_json(), tmp_path / "cpu", {}, module="env_probe_stage", gpus=0, env=env)
    assert cpu["env"]["CUDA_VISIBLE_DEVICES"] == ""
    roots = ["/a/attempt-1/checkpoints", "s3://b/attempt-0/checkpoints"]
    probe = launch.launch("probe", cfg.to_json(), tmp_path / "r", {}, module="env_probe_stage", resume_from=roots,
                          env=env)
    assert [probe["argv"][i + 1] for i, a in enumerate(probe["argv"]) if a == "--resume-from"] == roots


def test_a_stage_whose_machine_lacks_its_gpus_or_disk_fails_in_seconds(tmp_path):
    """Checked on the stage's own machine (its pod), before it writes: GPUs asked for and not there, disk."""
    import time

    if launch.visible_gpus():
        pytest.skip("this machine has a GPU")
    base = config.load(TEST_CONFIG).model_dump()
    started = time.time()
    gpu = config.validate({**base, "run": {**base["run"], "gpus": 1}})
    with pytest.raises(launch.MachineUnfit, match=r"run.gpus = 1 asks 1 GPU\(s\) for this stage, but this machine has 0"):
        machine.check_machine(gpu, "sft", tmp_path)
    assert machine.check_machine(gpu, "data", tmp_path) == 0  # the data step asks for none
    disk = config.validate({**base, "run": {**base["run"], "min_free_disk_gb": 1e9}})
    with pytest.raises(launch.MachineUnfit, match="resources.infer.disk_mb"):
        machine.check_machine(disk, "evaluate", tmp_path)
    assert time.time() - started < 5


def test_in_a_pod_the_disk_is_what_the_pod_asked_for(tmp_path, monkeypatch):
    """The node's filesystem may show far more free than the pod may write (its ephemeral storage request): in a
    pod the check compares with resources.<kind>.disk_mb."""
    base = config.load(TEST_CONFIG).model_dump()
    small = config.validate({**base, "run": {**base["run"], "min_free_disk_gb": 2.0},
                             "resources": {**base["resources"], "train": {**base["resources"]["train"],
                                                                           "disk_mb": 1024}}})
    machine.check_disk(small, "sft", "train", tmp_path)  # not in a pod: the filesystem has room
    monkeypatch.setenv("METAFLOW_KUBERNETES_WORKLOAD", "1")
    with pytest.raises(launch.MachineUnfit, match=r"this pod asked for 1.1 GB of disk \(resources.train.disk_mb"):
        machine.check_disk(small, "sft", "train", tmp_path)


def test_a_local_run_takes_one_task_per_core_unless_told_otherwise(monkeypatch):
    """Metaflow's 16 side-by-side tasks oversubscribe a machine with fewer cores (a six-method run on 2 cores:
    190 s, 148 s with two workers); a run sent to a cluster, or on a machine with 16 cores, keeps Metaflow's
    default, and what the user exported wins (`env.configure` only sets a default)."""
    from rlhf_lib import env

    monkeypatch.delenv("METAFLOW_DEFAULT_DECOSPECS", raising=False)
    local = ["flows/rlhf_flow.py", "run"]
    assert env.local_workers(local, 2) == {"METAFLOW_RUN_MAX_WORKERS": 2, "METAFLOW_RESUME_MAX_WORKERS": 2}
    assert env.local_workers(local, 16) == {}
    assert env.local_workers([*local[:1], "--with", "kubernetes", "run"], 2) == {}
    monkeypatch.setenv("METAFLOW_DEFAULT_DECOSPECS", "kubernetes:cpu=4")
    assert env.local_workers(local, 2) == {} and env.runs_remote(local)  # and retries, preflight: remote
    monkeypatch.setenv("METAFLOW_RUN_MAX_WORKERS", "5")
    monkeypatch.delenv("METAFLOW_DEFAULT_DECOSPECS")
    env.configure()
    import os

    assert os.environ["METAFLOW_RUN_MAX_WORKERS"] == "5"
