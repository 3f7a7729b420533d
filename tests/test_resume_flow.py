"""The users' ask: a PPO step that dies mid-stage is resumed with `resume ppo` and continues where it stopped.

The PPO subprocess is killed with SIGKILL once a checkpoint is on disk (found by polling the disk, not by a
hook in the product); `resume ppo` through the CLI must reuse every upstream artifact, continue from that
checkpoint, and end with the stats of an uninterrupted PPO on the same inputs.
"""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, write_config
from rlhf_lib import launch

pytestmark = pytest.mark.slow  # whole flow runs

FLOW = str(ROOT / "flows" / "rlhf_flow.py")
SECRET = "sk-test-do-not-store-0123456789"


@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory):
    store = tmp_path_factory.mktemp("resume_store")
    # Fixed threads: the comparison with an uninterrupted run is to 1e-4, and a different thread count (the auto
    # policy follows the machine's load) reorders float sums.
    # No retries: this test is about `resume` after the run failed (tests/test_cluster.py covers @retry).
    cfg = write_config(store / "cfg.toml", {"run": {"storage_root": str(store), "cpu_threads": 2, "local_retries": 0,
                                                    "methods": ["ppo", "dpo"]},
                                            "sft": {"max_steps": 10}, "reward": {"max_steps": 20},
                                            "ppo": {"steps": 12}, "eval": {"num_prompts": 16, "curve": False}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_API_KEY": SECRET,
           "HF_TOKEN": SECRET}
    proc = subprocess.Popen([sys.executable, FLOW, "--config", "config", str(cfg), "run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_at, deadline = None, time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = sorted(store.glob("RLHFFlow/*/ppo/attempt-0/checkpoints/step-*/COMPLETE"))
        stage = launch.stage_process(proc.pid, "ppo")
        if done and stage is not None:
            stage.send_signal(signal.SIGKILL)
            killed_at = done
            break
        time.sleep(0.2)
    run_log = proc.communicate(timeout=300)[0]
    assert killed_at, f"no PPO checkpoint appeared before the run ended:\n{run_log[-3000:]}"
    assert proc.returncode != 0, "the flow must fail when its PPO subprocess is killed"
    origin_run_id = killed_at[0].parts[-6]
    ckpt_root = store / "RLHFFlow" / origin_run_id / "ppo" / "attempt-0" / "checkpoints"
    newest = max(int(p.name.split("-")[1]) for p in ckpt_root.glob("step-*") if (p / "COMPLETE").exists())

    from metaflow import Flow

    before = {r.id for r in Flow("RLHFFlow").runs()}
    resume = subprocess.run([sys.executable, FLOW, "resume", "ppo", "--origin-run-id", origin_run_id],
                            env=env, capture_output=True, text=True, timeout=900)
    assert resume.returncode == 0, resume.stdout[-4000:] + resume.stderr[-4000:]
    (resumed_id,) = {r.id for r in Flow("RLHFFlow").runs()} - before
    return {"store": store, "origin": origin_run_id, "resumed": resumed_id, "newest": newest,
            "log": resume.stdout + resume.stderr, "cfg": cfg}


def _run(run_id):
    from metaflow import Run

    return Run(f"RLHFFlow/{run_id}")


def test_resume_continues_ppo_from_the_checkpoint(crashed_and_resumed):
    info = crashed_and_resumed
    assert f"resumed from step {info['newest']}" in info["log"]
    newest = info["store"] / "RLHFFlow" / info["origin"] / "ppo" / "attempt-0" / "checkpoints" / \
        f"step-{info['newest']:06d}"
    assert f"continuing from {newest}" in info["log"]
    resumed = _run(info["resumed"])
    assert resumed.successful
    assert resumed.data.ppo_resumed_from_step == info["newest"]


def test_upstream_artifacts_are_reused(crashed_and_resumed):
    origin, resumed = _run(crashed_and_resumed["origin"]), _run(crashed_and_resumed["resumed"])
    for step, name in (("sft", "sft_adapter_path"), ("merge", "sft_merged_path"), ("reward", "reward_model_path")):
        assert getattr(resumed[step].task.data, name) == getattr(origin[step].task.data, name)
    # Cloned steps were not re-executed: the resumed run's stage directories hold ppo onwards, plus a sibling
    # branch only when the crash stopped it before it finished (a finished sibling is cloned).
    stages = {p.name for p in (crashed_and_resumed["store"] / "RLHFFlow" / resumed.id).iterdir() if p.is_dir()}
    assert {"ppo", "evaluate"} <= stages <= {"ppo", "dpo", "evaluate"}
    # ...and the record of the run it was resumed from (a resume of this resume continues along the chain)
    assert (crashed_and_resumed["store"] / "RLHFFlow" / resumed.id / "ORIGIN").read_text().strip() == origin.id
    for sibling in ("dpo",):
        try:
            finished = origin[sibling].task.successful
        except KeyError:  # the crash came before this branch started
            finished = False
        if finished:
            assert sibling not in stages
            assert getattr(resumed[sibling].task.data, f"{sibling}_model_path") == \
                getattr(origin[sibling].task.data, f"{sibling}_model_path")
    assert set(resumed.data.eval_report) == {"sft", "ppo", "dpo"}


def test_resumed_stats_equal_an_uninterrupted_run(crashed_and_resumed, tmp_path):
    from rlhf_lib import config

    resumed = _run(crashed_and_resumed["resumed"])
    cfg = config.load(crashed_and_resumed["cfg"])
    reference = launch.launch("ppo", cfg.to_json(), tmp_path / "reference", {
        "sft_model": resumed.data.sft_merged_path, "reward_model": resumed.data.reward_model_path,
        "prompts": resumed.data.datasets["prompts_train"]["uri"]})
    got, expected = resumed.data.ppo_stats, reference["stats"]
    assert len(got) == len(expected) == cfg.ppo.steps
    for a, b in zip(got, expected):
        for key, value in b.items():
            if isinstance(value, float):
                assert math.isclose(a[key], value, rel_tol=1e-4, abs_tol=1e-4), (a["step"], key, a[key], value)


def test_no_secret_is_stored(crashed_and_resumed):
    """Keys in the environment never reach an artifact, a stage output or a log."""
    roots = [crashed_and_resumed["store"], ROOT / ".metaflow" / "RLHFFlow"]
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert SECRET.encode() not in path.read_bytes(), path
