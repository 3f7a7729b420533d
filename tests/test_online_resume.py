"""GRPO and RLOO continue from their own checkpoints: SIGKILL a stage after a checkpoint, start it again as the next
attempt with the first one's checkpoints to continue from (what a retry or a `resume` gives it), and it ends
where an uninterrupted run ends."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TEST_CONFIG
from rlhf_lib import config

pytestmark = pytest.mark.slow  # three stage runs per method

STEPS, SAVE = 8, 2


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    from rlhf_lib.config import DatasetSource
    from rlhf_lib.data import lake

    return lake.materialise("prompts", DatasetSource(), "train", tmp_path_factory.mktemp("prompts"), seed=0,
                            sample_rows=64)["uri"]


def _argv(tmp_path, method: str, out, inputs: dict, roots=()) -> list[str]:
    raw = config.load(TEST_CONFIG).model_dump()
    raw["run"].update(wandb_mode="disabled", cpu_threads=1)
    raw[method].update(max_steps=STEPS, save_steps=SAVE, logging_steps=1, batch_size=8, num_generations=4,
                       max_completion_length=16)
    (tmp_path / f"{method}.json").write_text(json.dumps(raw))
    argv = ["--config", str(tmp_path / f"{method}.json"), "--output", str(out)]
    argv += [a for k, v in inputs.items() for a in ("--input", f"{k}={v}")]
    argv += [a for root in roots for a in ("--resume-from", str(root))]
    return [sys.executable, "-m", f"rlhf_lib.stages.{method}", *argv]


def _run(cmd, log):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_killed_after_a_checkpoint_the_next_attempt_continues_from_it(method, tiny_policy, prompts, tmp_path):
    inputs = {"sft_model": tiny_policy, "prompts": prompts, "reward_function": "function:rlhf_lib.judges:rule_reward"}
    _run(_argv(tmp_path, method, tmp_path / "whole", inputs), tmp_path / "whole.log")
    whole = json.loads((tmp_path / "whole" / "result.json").read_text())

    first = tmp_path / method / "attempt-0"
    proc = subprocess.Popen(_argv(tmp_path, method, first, inputs), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    target = first / "checkpoints" / f"checkpoint-{2 * SAVE}" / "trainer_state.json"
    deadline = time.time() + 600
    while not target.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(0.5)  # HF writes trainer_state.json last; let the copy finish
    assert proc.poll() is None, "the stage ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (first / "result.json").exists()

    second = tmp_path / method / "attempt-1"
    log = _run(_argv(tmp_path, method, second, inputs, roots=[first / "checkpoints"]), tmp_path / "second.log")
    resumed = json.loads((second / "result.json").read_text())
    k = resumed["resumed_from_step"]
    assert k >= 2 * SAVE and f"continuing from {first / 'checkpoints' / f'checkpoint-{k}'}" in log
    assert sorted(p.name for p in (second / "snapshots").iterdir())[0] == f"step-{SAVE:06d}"  # the curve kept
    assert resumed["metrics"]["steps"] == STEPS
    got = {s["step"]: s for s in resumed["stats"]}
    for expected in whole["stats"]:
        for key in ("loss", "reward", "kl"):
            if key in expected:
                assert math.isclose(got[expected["step"]][key], expected[key], rel_tol=1e-4, abs_tol=1e-5), \
                    (expected["step"], key, got[expected["step"]][key], expected[key])
