"""The stage contract shared by every `python -m rlhf_lib.stages.X` entry point.

Input: `--config run.json` (the run config as JSON), `--output DIR`, upstream paths as repeated
`--input name=path`, optionally `--resume-from ROOT` (repeatable) and `--checkpoint-uri`. Output: `DIR/result.json`, written last and atomically,
with the paths the stage produced, its metrics and the library versions; exit code 0 only when it is complete.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rlhf_lib import env

env.configure()

from rlhf_lib.config import RunConfig  # noqa: E402

RESULT_FILE = "result.json"
SNAPSHOTS = "snapshots"  # DIR/snapshots/step-N: an online method's adapter at each checkpoint, never pruned


def parse_args(stage: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m rlhf_lib.stages.{stage}", description=__doc__)
    parser.add_argument("--config", required=True, help="run config as JSON (a file path)")
    parser.add_argument("--output", required=True, help="directory for this stage's outputs")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=PATH", help="an upstream path")
    parser.add_argument("--resume-from", action="append", default=[], metavar="ROOT",
                        help="a checkpoint, or a directory or s3:// prefix of them, to continue from (repeatable: the "
                             "newest that loads wins); earlier attempts of this task and a resume's origin run")
    parser.add_argument("--checkpoint-uri", default=None,
                        help="this attempt's own checkpoint location; an s3:// URI: each checkpoint is also stored "
                             "there as it is written (marker last)")
    parser.add_argument("--run-id", default="standalone", help="Metaflow run id (names W&B runs)")
    parser.add_argument("--part", default=None, metavar="K/N",
                        help="train on rows i with i %% N == K only (disjoint parts train independent models)")
    args = parser.parse_args(argv)
    if args.part is not None:
        k, sep, n = args.part.partition("/")
        if not (sep and k.isdigit() and n.isdigit() and int(k) < int(n)):
            parser.error(f"--part takes K/N with 0 <= K < N, got {args.part!r}")
        args.part = (int(k), int(n))
    inputs = {}
    for item in args.input:
        name, sep, path = item.partition("=")
        if not sep:
            parser.error(f"--input takes NAME=PATH, got {item!r}")
        inputs[name] = path
    args.inputs = inputs
    return args


def start(stage: str, argv: list[str] | None, *required: str):
    """The preamble every stage shares: (start time, args, config, required input paths, output dir), seeded."""
    started = time.time()
    args = parse_args(stage, argv)
    cfg = load_config(args.config)
    paths = require(args.inputs, *required)
    seed_everything(cfg.run.seed)
    import torch

    if not torch.cuda.is_available():
        from rlhf_lib import cpu

        threads = cpu.set_threads(cfg.run.cpu_threads)
        print(f"[{stage}] {threads} CPU thread(s) (run.cpu_threads = {cfg.run.cpu_threads or 'auto: the free cores'})",
              flush=True)
    return started, args, cfg, paths, Path(args.output)


def hf_training_kwargs(cfg: RunConfig, section, stage: str, output: Path) -> dict[str, Any]:
    """TrainingArguments shared by the HF-Trainer stages (sft, reward, dpo, rest, grpo, rloo), from their section."""
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
        logging_first_step=True, dataloader_num_workers=0, **trainer_precision(),
    )


def load_config(path: str) -> RunConfig:
    return RunConfig.model_validate(json.loads(Path(path).read_text()))


def require(inputs: dict[str, str], *names: str) -> list[str]:
    missing = [n for n in names if n not in inputs]
    if missing:
        raise SystemExit(f"missing --input {', '.join(n + '=PATH' for n in missing)}")
    return [inputs[n] for n in names]


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "deeplake"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def atomic_write_json(path: Path, payload: Any) -> None:
    """Write JSON via a temp file, fsync and rename: readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def peak_memory() -> dict[str, float]:
    """This process's peak resident memory and, on a GPU, peak allocated GPU memory (GB)."""
    import resource

    import torch

    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    per_unit = 1 if sys.platform == "darwin" else 1024
    peak = {"cpu_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * per_unit / 1e9, 3)}
    if torch.cuda.is_available():
        peak["gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
    return peak


def write_result(output: Path, stage: str, started: float, **payload: Any) -> Path:
    result = {"stage": stage, "seconds": round(time.time() - started, 1), "versions": versions(),
              "peak_memory": peak_memory(), **payload}
    path = Path(output) / RESULT_FILE
    atomic_write_json(path, result)
    return path


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def trainer_precision() -> dict[str, Any]:
    """TRL configs default to bf16; use it only where a GPU has it, and say use_cpu on a CPU-only machine."""
    import torch

    if torch.cuda.is_available():
        return {"bf16": torch.cuda.is_bf16_supported(), "fp16": False, "use_cpu": False}
    return {"bf16": False, "fp16": False, "use_cpu": True}


def report_to(cfg: RunConfig) -> list[str]:
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


def save_snapshot(adapter_model, output: Path, step: int, checkpoint_uri: str | None = None) -> Path:
    """The adapter as it is at `step`, kept for good under DIR/snapshots/step-N (atomic): the evaluation scores
    every snapshot of an online method for its over-optimisation curve. With an S3 `checkpoint_uri` it is stored
    beside the attempt's checkpoints at once, so a retried or resumed attempt elsewhere keeps the whole curve."""
    from rlhf_lib import checkpoints, storage

    path = checkpoints.atomic_dir(Path(output) / SNAPSHOTS / f"step-{step:06d}",
                                  lambda tmp: adapter_model.save_pretrained(tmp, safe_serialization=True),
                                  is_complete=lambda p: (p / "adapter_config.json").exists())
    if checkpoint_uri and storage.is_remote(checkpoint_uri):
        storage.upload_dir(path, storage.join(checkpoints.snapshots_beside(checkpoint_uri), path.name))
    return path


def snapshot_callback(output: Path, checkpoint_uri: str | None = None):
    """An HF TrainerCallback that keeps the adapter of every checkpoint the Trainer saves as a snapshot."""
    from transformers import TrainerCallback

    class KeepSnapshots(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and model is not None:
                save_snapshot(model, output, state.global_step, checkpoint_uri)

    return KeepSnapshots()


def log_history_stats(log_history: list[dict]) -> list[dict]:
    """An HF trainer's training log entries (one dict per logged step, numbers only): a method's `stats`."""
    return [{k: v for k, v in entry.items() if isinstance(v, (int, float))} for entry in log_history
            if "step" in entry and not any(k.startswith(("eval_", "train_runtime")) for k in entry)]


def mirror(args) -> str | None:
    """Where a stage also stores each checkpoint as it writes it: its attempt's S3 prefix; None when the attempt's
    checkpoint directory is the stage's own local one."""
    from rlhf_lib import storage

    return args.checkpoint_uri if storage.is_remote(args.checkpoint_uri) else None


def step_of(path: str | None) -> int:
    """The step a checkpoint directory (`checkpoint-N`, `step-N`) was saved at; 0 for none."""
    return int(Path(path).name.split("-")[-1]) if path else 0


def adopt(checkpoint: Path, own_root: Path) -> Path:
    """Copy a checkpoint from elsewhere (an earlier attempt, a resume's origin run) into this stage's own checkpoint
    directory, atomically, so that a resume of this attempt later still finds it if it dies before saving."""
    from rlhf_lib.checkpoints import atomic_dir

    target = Path(own_root) / Path(checkpoint).name
    if Path(checkpoint).resolve() == target.resolve():
        return target
    return atomic_dir(target, lambda tmp: shutil.copytree(checkpoint, tmp, dirs_exist_ok=True))


def resume_point(stage: str, roots: list[str], output: Path, load, checkpoint_uri: str | None = None
                 ) -> tuple[Path, object] | None:
    """Where a stage continues: the newest checkpoint that `load` accepts, among those in its own directory (a
    rerun of this attempt) and under `roots` (earlier attempts of this task, then a resume's origin run; local
    directories or S3 prefixes). One in S3 is downloaded first; one that fails to load is said and the next older
    one tried. One from elsewhere is copied into this stage's own directory with the snapshots it had up to its
    step. Every outcome is said, "starting at step 0" included. Returns (local checkpoint, what `load` gave)."""
    from rlhf_lib import checkpoints

    own_root = Path(output) / "checkpoints"
    candidates = checkpoints.newest_first([own_root, *roots])
    where = ", ".join(str(r) for r in roots) or "this stage's own directory"
    if not candidates:
        print(f"[{stage}] no checkpoint in {where}: starting at step 0", flush=True)
        return None
    for i, (step, location) in enumerate(candidates):
        try:
            local = checkpoints.fetch(location, Path(output) / ".fetched")
            state = load(local)
        except Exception as err:  # torn, corrupt, or pruned while downloading: the next older one
            following = f"trying {candidates[i + 1][1]}" if i + 1 < len(candidates) else "starting at step 0"
            print(f"[{stage}] checkpoint {location} failed to load ({type(err).__name__}: {err}): {following}",
                  flush=True)
            continue
        if Path(local).parent.resolve() != own_root.resolve():
            source_root = location.rstrip("/").rsplit("/", 1)[0]
            local = adopt(Path(local), own_root)
            snapshots = checkpoints.fetch_snapshots(source_root, step, Path(output) / SNAPSHOTS)
            print(f"[{stage}] continuing from {location} (step {step}; {snapshots} snapshot(s) of the curve with it)",
                  flush=True)
        shutil.rmtree(Path(output) / ".fetched", ignore_errors=True)
        return Path(local), state
    return None


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


def mirror_checkpoints_callback(checkpoint_uri: str, keep: int | None):
    """An HF TrainerCallback that stores each checkpoint at `checkpoint_uri` as soon as the Trainer has saved it."""
    from transformers import TrainerCallback

    from rlhf_lib import checkpoints

    class MirrorCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                checkpoints.publish(Path(args.output_dir) / f"checkpoint-{state.global_step}", checkpoint_uri, keep)

    return MirrorCheckpoints()


def train_resumable(trainer, stage: str, roots: list[str], output: Path, checkpoint_uri: str | None = None):
    """trainer.train() continued from the newest checkpoint that loads (see `resume_point`), each new checkpoint
    also stored at `checkpoint_uri` when that is in S3. Returns (train output, the checkpoint resumed from)."""
    from rlhf_lib import storage

    if checkpoint_uri and storage.is_remote(checkpoint_uri):
        trainer.add_callback(mirror_checkpoints_callback(checkpoint_uri, trainer.args.save_total_limit))
    found = resume_point(stage, roots, output, check_trainer_checkpoint, checkpoint_uri)
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
    Every process must call it (saving synchronises them); True on the main process only."""
    trainer.save_model(str(directory))
    if not is_main_process():
        return False
    tokenizer.save_pretrained(directory)
    (Path(directory) / "training_args.bin").unlink(missing_ok=True)  # a pickle; nothing here needs it
    return True
