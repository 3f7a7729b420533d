"""SFT and reward stages resume from HF Trainer checkpoints, including those of another (origin) run."""

import json
import math
import shutil

import pytest

from conftest import TEST_CONFIG
from rlhf_lib import config, models
from rlhf_lib.config import DatasetSource, TinyModelSpec
from rlhf_lib.data import lake
from rlhf_lib.stages import reward


@pytest.fixture(scope="module")
def reward_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_inputs")
    base = models.prepare("tiny", TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, ffn_dim=64,
                                                vocab_size=400, max_positions=128), "reward", root, seed=0)
    src = DatasetSource(eval_rows=16)
    train = lake.materialise("preference", src, "train", root, seed=0, sample_rows=200)
    held = lake.materialise("preference", src, "eval", root, seed=0, sample_rows=200)
    return {"base_model": base, "train": train["uri"], "eval": held["uri"]}


def _run(tmp_path, name, inputs, resume_from=None):
    raw = config.load(TEST_CONFIG).model_dump()
    raw["run"]["wandb_mode"] = "disabled"
    raw["reward"].update(max_steps=20, save_steps=10, logging_steps=5, eval_steps=10, batch_size=8,
                         learning_rate=5e-3)
    (tmp_path / "run.json").write_text(json.dumps(raw))
    argv = ["--config", str(tmp_path / "run.json"), "--output", str(tmp_path / name)]
    argv += [a for k, v in inputs.items() for a in ("--input", f"{k}={v}")]
    if resume_from:
        argv += ["--resume-from", str(resume_from)]
    reward.main(argv)
    return json.loads((tmp_path / name / "result.json").read_text())


def test_reward_stage_resumes_from_an_origin_checkpoint(reward_inputs, tmp_path):
    full = _run(tmp_path, "origin", reward_inputs)
    ckpts = tmp_path / "origin" / "checkpoints"
    shutil.rmtree(ckpts / "checkpoint-20")  # as if the origin died between step 10 and 20
    resumed = _run(tmp_path, "resumed", reward_inputs, resume_from=ckpts)
    assert resumed["resumed_from"].endswith("checkpoint-10")
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-10").exists()  # adopted into its own dir
    full_loss = dict(map(tuple, full["metrics"]["curves"]["loss"]))
    resumed_loss = dict(map(tuple, resumed["metrics"]["curves"]["loss"]))
    assert full_loss[20] < full_loss[1] - 0.01  # it really trained, so equal losses mean something
    assert resumed["metrics"]["steps"] == 20
    for step, loss in resumed_loss.items():
        assert math.isclose(loss, full_loss[step], rel_tol=1e-4, abs_tol=1e-5), (step, loss, full_loss[step])
    assert math.isclose(resumed["metrics"]["eval_accuracy"], full["metrics"]["eval_accuracy"])


def test_no_in_training_evaluation_when_eval_steps_exceed_max_steps(tmp_path):
    """HF evaluates at the last step of any step schedule; the reward stage then scored the held-out pairs twice."""
    from rlhf_lib.stages import hf

    cfg = config.load(TEST_CONFIG)
    never = cfg.reward.model_copy(update={"eval_steps": cfg.reward.max_steps + 1})
    assert hf.training_kwargs(cfg, never, "reward", tmp_path)["eval_strategy"] == "no"
    assert hf.training_kwargs(cfg, cfg.reward, "reward", tmp_path)["eval_strategy"] == "steps"


def test_an_hf_checkpoint_implies_its_snapshot(tiny_policy, tmp_path, monkeypatch):
    """GRPO and RLOO keep the adapter of every HF checkpoint as a snapshot (a point of the over-optimisation
    curve). It was written after the checkpoint (on_save), so a kill between the two resumed past a step with no
    snapshot. A real Trainer, killed the moment its first checkpoint is complete."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from rlhf_lib import checkpoints
    from rlhf_lib.stages import hf

    class Killed(BaseException):  # as uncatchable for the stage as a SIGKILL
        pass

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_policy), LoraConfig(r=2, target_modules=["q_proj"]))
    rows = [{"input_ids": torch.arange(8), "labels": torch.arange(8)} for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), max_steps=4, save_steps=2,
                             per_device_train_batch_size=2, report_to=[], use_cpu=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.add_callback(hf.snapshot_callback(tmp_path))
    real_save = trainer._save_checkpoint

    def save_then_die(*a, **kw):
        real_save(*a, **kw)
        raise Killed

    monkeypatch.setattr(trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        trainer.train()
    assert (tmp_path / "checkpoints" / "checkpoint-2").is_dir()
    assert [step for step, _ in checkpoints.complete_snapshots(tmp_path / "snapshots")] == [2]
