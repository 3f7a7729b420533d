"""What the stages built on Hugging Face's Trainer share (sft, reward, dpo, rest's Improve, grpo, rloo): their
TrainingArguments from a config section, training continued from the newest checkpoint that loads, each checkpoint
stored at the attempt's S3 prefix as it is written, an online method's snapshots, and the saved model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf_lib import checkpoints, precision, storage, uploads
from rlhf_lib.stages import contract
from rlhf_lib.stages.contract import is_main_process


def training_kwargs(cfg, section, stage: str, output: Path) -> dict[str, Any]:
    """TrainingArguments shared by the HF-Trainer stages, from their section."""
    from rlhf_lib import tracking

    return dict(
        output_dir=str(output / "checkpoints"), run_name=tracking.run_name(stage), report_to=report_to(cfg),
        max_steps=section.max_steps, per_device_train_batch_size=section.batch_size,
        per_device_eval_batch_size=section.batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps, learning_rate=section.learning_rate,
        lr_scheduler_type=section.lr_scheduler, warmup_steps=section.warmup_steps,
        logging_steps=section.logging_steps, save_steps=section.save_steps, save_total_limit=2,
        # HF evaluates at the last step of a step-based schedule even when eval_steps > max_steps; "no" then.
        # Sections without held-out data (grpo, rloo) have no eval_steps.
        eval_strategy="steps" if getattr(section, "eval_steps", None) and section.eval_steps <= section.max_steps
        else "no", eval_steps=getattr(section, "eval_steps", None), seed=cfg.run.seed, data_seed=cfg.run.seed,
        logging_first_step=True, dataloader_num_workers=0, ddp_timeout=cfg.run.process_group_timeout_s,
        disable_tqdm=True,  # rlhf_lib/progress.py prints the stage's progress, at a rate a long log can hold
        **precision.current().trainer_arguments(),
    )


def report_to(cfg) -> list[str]:
    return [] if cfg.run.wandb_mode == "disabled" else ["wandb"]


def log_history_summary(log_history: list[dict]) -> dict[str, list]:
    """Loss/metric curves from an HF trainer's log history, for artifacts and plots."""
    curves: dict[str, list] = {}
    for entry in log_history:
        step = entry.get("step")
        for key, value in entry.items():
            if key in ("step", "epoch") or not isinstance(value, (int, float)):
                continue
            curves.setdefault(key, []).append([step, value])
    return curves


def log_history_stats(log_history: list[dict]) -> list[dict]:
    """An HF trainer's training log entries (one dict per logged step, numbers only): a method's `stats`."""
    return [{k: v for k, v in entry.items() if isinstance(v, (int, float))} for entry in log_history
            if "step" in entry and not any(k.startswith(("eval_", "train_runtime")) for k in entry)]


def snapshot_callback(output: Path, checkpoint_uri: str | None = None):
    """An HF TrainerCallback that keeps the adapter of every checkpoint the Trainer saves as a snapshot — written
    before the checkpoint (at the end of the step the Trainer is about to save), so that a checkpoint implies its
    point of the curve: a kill between the two replays the step from the previous checkpoint."""
    from transformers import TrainerCallback

    class KeepSnapshots(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if control.should_save and state.is_world_process_zero and model is not None:
                checkpoints.save_snapshot(model, output, state.global_step, checkpoint_uri)

    return KeepSnapshots()


def timing_callback(stage: str):
    """An HF TrainerCallback that says how long each checkpoint took to write (from the end of its optimizer step,
    which the save follows, to the Trainer's on_save)."""
    import time

    from transformers import TrainerCallback

    class SaveTimes(TrainerCallback):
        step_ended = None

        def on_step_end(self, args, state, control, **kwargs):
            self.step_ended = time.time()

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero and self.step_ended:
                print(f"[{stage}] checkpoint-{state.global_step} written in {time.time() - self.step_ended:.1f} s",
                      flush=True)

    return SaveTimes()


def mirror_checkpoints_callback(checkpoint_uri: str, keep: int | None):
    """An HF TrainerCallback that stores each checkpoint at `checkpoint_uri` as soon as the Trainer has saved it."""
    from transformers import TrainerCallback

    class MirrorCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:  # stored in the background, from a snapshot of it taken now
                checkpoints.publish_later(Path(args.output_dir) / f"checkpoint-{state.global_step}", checkpoint_uri,
                                          keep)

    return MirrorCheckpoints()


def check_trainer_checkpoint(path: Path) -> Path:
    """An HF Trainer checkpoint that can be resumed from: its state parses and every safetensors file opens.
    Raises otherwise (the caller then tries an older one)."""
    import json

    from safetensors import safe_open

    json.loads((Path(path) / "trainer_state.json").read_text())
    weights = list(Path(path).glob("*.safetensors"))
    if not weights:
        raise ValueError(f"{path} holds no safetensors weights")
    for file in weights:
        with safe_open(str(file), framework="pt") as fh:
            list(fh.keys())
    return Path(path)


def train_resumable(trainer, stage: str, roots: list[str], output: Path, checkpoint_uri: str | None = None,
                    progress_callback=None):
    """trainer.train() continued from the newest checkpoint that loads (`checkpoints.resume_point`), each new
    checkpoint also stored at `checkpoint_uri` when that is another place than the trainer's own directory; its
    progress reported (`progress_callback`, or a new `progress.hf_callback`). Returns (train output, the checkpoint
    resumed from)."""
    from rlhf_lib import progress

    trainer.add_callback(timing_callback(stage))
    trainer.add_callback(progress_callback or progress.hf_callback(stage, output))
    mirror = storage.mirror_of(checkpoint_uri)
    if mirror:
        trainer.add_callback(mirror_checkpoints_callback(mirror, trainer.args.save_total_limit))
    precision.keep_trained_in_fp32(trainer.model)  # before train() builds the optimizer over them
    found = checkpoints.resume_point(stage, roots, output, check_trainer_checkpoint, checkpoint_uri)
    resume = str(found[0]) if found else None
    if resume:
        from transformers.trainer_callback import TrainerState

        saved = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        if trained_to_the_end(trainer, saved):
            print(f"[{stage}] {resume} is the last step of training: nothing left to train", flush=True)
            return finished_from(trainer, Path(resume), saved), resume
        print(f"[{stage}] resuming from {resume}", flush=True)
    return trainer.train(resume_from_checkpoint=resume), resume


def trained_to_the_end(trainer, saved) -> bool:
    """Whether a checkpoint's TrainerState was saved at the last step of the training the trainer is set up for
    (the stage died after its final save: merging, saving, or writing its result)."""
    planned = trainer.args.max_steps if trainer.args.max_steps > 0 else (saved.max_steps or 0)
    return planned > 0 and saved.global_step >= planned


def finished_from(trainer, checkpoint: Path, saved):
    """What `trainer.train()` would have returned at the end, from a checkpoint saved at the last step (`saved`: its
    TrainerState): its weights and state loaded, nothing trained. transformers (5.x) resumed from such a checkpoint
    runs one step past `max_steps` before it checks for the end, which would change the model and its step count."""
    from transformers.trainer_utils import TrainOutput

    trainer._load_from_checkpoint(str(checkpoint))  # the loader train() itself uses: full weights or an adapter
    trainer.state = saved
    # With equal logging intervals the mean logged loss is the run's mean training loss, as train() reports it
    losses = [e["loss"] for e in trainer.state.log_history if isinstance(e.get("loss"), (int, float))]
    loss = sum(losses) / len(losses) if losses else float("nan")
    return TrainOutput(trainer.state.global_step, loss, {"train_loss": loss})


def save_trained(trainer, tokenizer, directory: Path) -> bool:
    """Save what an HF trainer trained (a model, or an adapter) and the tokenizer beside it, as safetensors.
    Every process must call it (saving synchronises them); True on the main process only, once every checkpoint
    and snapshot it stored in the background is in place."""
    trainer.save_model(str(directory))
    if not is_main_process():
        return False
    uploads.UPLOADS.wait()
    tokenizer.save_pretrained(directory)
    (Path(directory) / "training_args.bin").unlink(missing_ok=True)  # a pickle; nothing here needs it
    return True


def finish_adapter(stage, trainer, tokenizer, sft_model: str, resumed_from: str | None, **finish) -> Path:
    """The tail of an HF-Trainer method: save the trained adapter (every process: saving synchronises them), then on
    the main process merge it and write the result (`contract.finish_policy`, with `finish`), naming the checkpoint
    the training resumed from."""
    adapter_dir = stage.out / "adapter"
    if save_trained(trainer, tokenizer, adapter_dir):
        contract.finish_policy(stage, adapter_dir, sft_model, resumed_from=resumed_from,
                               resumed_from_step=checkpoints.step_of(resumed_from) or 0, **finish)
    return stage.out
