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

# Steps are cheap next to loading: enough of them after the kill point that the kill lands before the end
STEPS, SAVE = 24, 4


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


def _parses(state_file) -> bool:
    try:
        json.loads(state_file.read_text())
        return True
    except (OSError, ValueError):
        return False


def _inputs(tiny_policy, prompts) -> dict:
    return {"sft_model": tiny_policy, "prompts": prompts, "reward_function": "function:rlhf_lib.judges:rule_reward"}


@pytest.fixture(scope="module", params=["grpo", "rloo"])
def whole(request, tiny_policy, prompts, tmp_path_factory):
    """(method, the output directory of an uninterrupted run, its result)."""
    method, tmp = request.param, tmp_path_factory.mktemp(request.param)
    _run(_argv(tmp, method, tmp / "whole", _inputs(tiny_policy, prompts)), tmp / "whole.log")
    return method, tmp / "whole", json.loads((tmp / "whole" / "result.json").read_text())


def _assert_same_training(resumed: dict, whole: dict):
    assert resumed["metrics"]["steps"] == STEPS
    got = {s["step"]: s for s in resumed["stats"]}
    assert sorted(got) == [s["step"] for s in whole["stats"]]
    for expected in whole["stats"]:
        for key in ("loss", "reward", "kl"):
            if key in expected:
                assert math.isclose(got[expected["step"]][key], expected[key], rel_tol=1e-4, abs_tol=1e-5), \
                    (expected["step"], key, got[expected["step"]][key], expected[key])


def test_killed_after_a_checkpoint_the_next_attempt_continues_from_it(whole, tiny_policy, prompts, tmp_path):
    method, _, whole = whole
    inputs = _inputs(tiny_policy, prompts)
    first = tmp_path / method / "attempt-0"
    proc = subprocess.Popen(_argv(tmp_path, method, first, inputs), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    target = first / "checkpoints" / f"checkpoint-{2 * SAVE}" / "trainer_state.json"
    deadline = time.time() + 600
    while not _parses(target) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)  # HF writes trainer_state.json last: once it parses, the checkpoint is whole
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
    _assert_same_training(resumed, whole)


def test_a_stage_that_died_after_its_last_checkpoint_trains_no_further(whole, tiny_policy, prompts, tmp_path):
    """A crash after the final save (while merging, or writing the result) leaves a checkpoint at the last step.
    The next attempt ends exactly where the uninterrupted run did; transformers resumed from such a checkpoint
    trains one step past max_steps (one more step here, which changes the adapter and the step count)."""
    import torch
    from safetensors.torch import load_file

    method, whole_dir, whole = whole
    assert (whole_dir / "checkpoints" / f"checkpoint-{STEPS}").is_dir()
    out = tmp_path / "attempt-1"
    log = _run(_argv(tmp_path, method, out, _inputs(tiny_policy, prompts), roots=[whole_dir / "checkpoints"]),
               tmp_path / "second.log")
    resumed = json.loads((out / "result.json").read_text())
    assert resumed["resumed_from_step"] == STEPS
    _assert_same_training(resumed, whole)
    assert "nothing left to train" in log
    assert math.isclose(resumed["metrics"]["train_loss"], whole["metrics"]["train_loss"], rel_tol=1e-4, abs_tol=1e-6)
    ours, theirs = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (out, whole_dir))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
