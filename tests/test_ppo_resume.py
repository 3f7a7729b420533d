"""PPO stage resume, without Metaflow: stop at step k (or lose the newest checkpoint), resume, and end with
exactly the trace of an uninterrupted run (CPU, 1e-4, as torchtune's resume test)."""

import json
import math

import pytest

from conftest import TEST_CONFIG
from rlhf_lib import checkpoints, config, models
from rlhf_lib.config import DatasetSource, TinyModelSpec
from rlhf_lib.data import lake
from rlhf_lib.stages.ppo import trainer

STEPS = 6


@pytest.fixture(scope="module")
def ppo_inputs(tiny_policy, tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_inputs")
    reward = models.prepare("tiny", TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, ffn_dim=64,
                                                  vocab_size=400, max_positions=128), "reward", root, seed=0)
    prompts = lake.materialise("prompts", DatasetSource(), "train", root, seed=0, sample_rows=40)
    return {"sft_model": tiny_policy, "reward_model": reward, "prompts": prompts["uri"]}


def _run(tmp_path, name, ppo_inputs, steps, resume_from=None):
    raw = config.load(TEST_CONFIG).model_dump()
    raw["run"]["wandb_mode"] = "disabled"
    raw["ppo"].update(steps=steps, batch_size=8, mini_batch_size=4, save_freq=2, keep_checkpoints=3,
                      min_response_length=4, max_response_length=12, stop_at_eos=False)
    raw["ppo"]["lora"].update(r=4, alpha=8)
    (tmp_path / f"{name}.json").write_text(json.dumps(raw))
    argv = ["--config", str(tmp_path / f"{name}.json"), "--output", str(tmp_path / "out" / name)]
    argv += [a for k, v in ppo_inputs.items() for a in ("--input", f"{k}={v}")]
    if resume_from:
        argv += ["--resume-from", str(resume_from)]
    trainer.main(argv)
    return json.loads((tmp_path / "out" / name / "result.json").read_text())


def _assert_same_trace(got, expected):
    assert [s["step"] for s in got] == [s["step"] for s in expected]
    for a, b in zip(got, expected):
        for key, value in b.items():
            if isinstance(value, float):
                assert math.isclose(a[key], value, rel_tol=1e-4, abs_tol=1e-4), (a["step"], key, a[key], value)


@pytest.fixture(scope="module")
def uninterrupted(ppo_inputs, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("full"), "full", ppo_inputs, STEPS)


def test_resume_matches_uninterrupted_run(uninterrupted, ppo_inputs, tmp_path, capsys):
    first = _run(tmp_path, "a", ppo_inputs, steps=STEPS // 2)
    assert first["resumed_from_step"] == 0
    second = _run(tmp_path, "a", ppo_inputs, steps=STEPS)  # same output dir: picks up its own checkpoint
    assert second["resumed_from_step"] == STEPS // 2
    assert f"resumed from step {STEPS // 2}" in capsys.readouterr().out
    _assert_same_trace(second["stats"], uninterrupted["stats"])
    assert uninterrupted["stats"][-1]["kl"] != 0  # the trace is not trivially equal


def test_corrupt_newest_checkpoint_falls_back_to_previous(uninterrupted, ppo_inputs, tmp_path, capsys):
    origin = _run(tmp_path, "origin", ppo_inputs, steps=4)  # checkpoints at 2 and 4
    ckpts = tmp_path / "out" / "origin" / "checkpoints"
    state = ckpts / "step-000004" / trainer.STATE_FILE
    state.write_bytes(state.read_bytes()[:100])  # truncated, as by a crash mid-copy
    (ckpts / "step-000006").mkdir()  # torn: never got its COMPLETE marker
    with pytest.warns(UserWarning, match="skipping"):
        resumed = _run(tmp_path, "resumed", ppo_inputs, steps=STEPS, resume_from=ckpts)
    assert origin["resumed_from_step"] == 0 and resumed["resumed_from_step"] == 2
    out = capsys.readouterr().out
    assert f"checkpoint {ckpts / 'step-000004'} failed to load" in out and f"trying {ckpts / 'step-000002'}" in out
    _assert_same_trace(resumed["stats"], uninterrupted["stats"])
    # The adopted checkpoint now lives in the resumed run's own directory too.
    assert (tmp_path / "out" / "resumed" / "checkpoints" / "step-000002" / "COMPLETE").exists()


def test_a_kill_right_after_a_checkpoint_keeps_that_steps_snapshot(ppo_inputs, tmp_path, monkeypatch):
    """Found by the full-size rehearsal: the snapshot (a point of the over-optimisation curve) was written after the
    checkpoint, so a SIGKILL between the two resumed past a step whose snapshot never existed. Every checkpoint's
    snapshot must be complete before the checkpoint is."""

    class Killed(BaseException):  # not an Exception: nothing in the stage may catch it, as nothing catches SIGKILL
        pass

    real_save = trainer.save_checkpoint

    def save_then_die(directory, step, *args, **kwargs):
        real_save(directory, step, *args, **kwargs)
        raise Killed(step)

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        _run(tmp_path, "killed", ppo_inputs, steps=STEPS)
    out = tmp_path / "out" / "killed"
    assert (out / "checkpoints" / "step-000002" / "COMPLETE").exists()
    assert [step for step, _ in checkpoints.complete_snapshots(out / "snapshots")] == [2]
