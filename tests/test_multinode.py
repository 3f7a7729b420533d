"""PPO across machines: Metaflow `@parallel` with run.nodes = 2, here as two local processes (Metaflow runs a
gang as local processes on one machine), one CPU process each, torch.distributed over gloo. Rank r samples its
own slice of every global prompt batch, the stats are gathered from both, and only rank 0 writes checkpoints."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, write_config

pytestmark = pytest.mark.slow  # a whole flow run

BATCH = 8  # prompts per rank; ppo.batch_size is the global batch, 2 x BATCH


def unactivated_env() -> dict:
    """This environment as an IDE, cron or a CI script runs a virtual environment's python: never activated, so
    PATH's `python` (which Metaflow starts the other nodes with) is not this interpreter."""
    here = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != here)
    return {**env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory):
    store = tmp_path_factory.mktemp("multinode")
    cfg = write_config(store / "cfg.toml", {
        "run": {"storage_root": str(store), "methods": ["ppo"], "nodes": 2, "cpu_threads": 1},
        "policy": {"tiny": {"pretrain_steps": 20}}, "eval": {"num_prompts": 8, "curve": False},
        "sft": {"max_steps": 10, "save_steps": 10}, "reward": {"max_steps": 20, "save_steps": 20},
        "ppo": {"steps": 4, "save_freq": 2, "batch_size": 2 * BATCH, "mini_batch_size": 4}})
    proc = subprocess.run([sys.executable, str(ROOT / "flows" / "rlhf_flow.py"), "--config", "config", str(cfg),
                           "run"], env=unactivated_env(), capture_output=True, text=True, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    run_id = re.search(r"Workflow starting \(run-id (\w+)\)", log).group(1)
    from metaflow import Run

    return {"run": Run(f"RLHFFlow/{run_id}"), "log": log, "stage_dir": store / "RLHFFlow" / run_id, "config": cfg}


def test_each_rank_samples_its_own_slice(two_node_run):
    log = two_node_run["log"]
    assert f"[ppo] rank 0/2: prompts [0, {BATCH}) of each global batch of {2 * BATCH}" in log
    assert f"[ppo] rank 1/2: prompts [{BATCH}, {2 * BATCH}) of each global batch of {2 * BATCH}" in log


def test_stats_are_gathered_from_both_ranks(two_node_run):
    data = two_node_run["run"].data
    assert data.ppo_status == "done" and data.ppo_metrics["ranks"] == 2
    assert len(data.ppo_stats) == 4
    assert all(s["samples"] == 2 * BATCH for s in data.ppo_stats)


def test_one_set_of_checkpoints_written_by_rank_zero(two_node_run):
    stage_dir = two_node_run["stage_dir"]
    attempt = stage_dir / "ppo" / "attempt-0"
    written = sorted(p.name for p in (attempt / "checkpoints").glob("step-*"))
    assert written == ["step-000002", "step-000004"]
    # The second node kept its own log and nothing else of PPO's.
    assert (attempt / "node-1" / "stage.log").exists()
    assert not list((attempt / "node-1").glob("checkpoints/step-*"))
    assert not (attempt / "node-1" / "result.json").exists()


def test_a_node_killed_before_it_joins_ends_the_gang_within_a_minute(two_node_run):
    """`resume ppo_gang_train`: node 1 is SIGKILLed as soon as Metaflow starts it, before it joins the
    rendezvous; node 0 sees it end and stops its own stage, so the run fails within a minute (torch's store would
    wait 900 s), naming what happened."""
    import signal
    import time

    import psutil

    run = two_node_run["run"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "flows" / "rlhf_flow.py"), "resume", "ppo_gang_train",
                             "--origin-run-id", run.id],
                            env=unactivated_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_at = None
    try:
        deadline = time.monotonic() + 600
        while killed_at is None and proc.poll() is None and time.monotonic() < deadline:
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    cmd = child.cmdline()
                except psutil.Error:
                    continue
                if "ppo_gang_train" in cmd and "--split-index" in cmd and cmd[cmd.index("--split-index") + 1] == "1":
                    child.send_signal(signal.SIGKILL)
                    killed_at = time.monotonic()
                    break
            time.sleep(0.2)
        log, _ = proc.communicate(timeout=300)
        ended = time.monotonic()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at is not None, log[-3000:]
    assert proc.returncode != 0 and ended - killed_at < 60, (ended - killed_at, log[-3000:])
    assert "another node of the ppo gang" in log and "ended with exit status -9" in log, log[-3000:]
