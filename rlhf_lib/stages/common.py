"""The stage contract shared by every `python -m rlhf_lib.stages.X` entry point.

Input: `--config run.json` (the run config as JSON), `--output DIR`, upstream paths as repeated
`--input name=path`, optionally `--resume-from CKPT`. Output: `DIR/result.json`, written last and atomically,
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
    parser.add_argument("--resume-from", default=None, help="checkpoint directory to resume from")
    parser.add_argument("--checkpoint-uri", default=None,
                        help="also store each checkpoint here as it is written (an s3:// URI; marker last)")
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

    peak = {"cpu_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)}  # KiB on Linux
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


def save_snapshot(adapter_model, output: Path, step: int) -> Path:
    """The adapter as it is at `step`, kept for good under DIR/snapshots/step-N (atomic): the evaluation scores
    every snapshot of an online method for its over-optimisation curve."""
    from rlhf_lib.checkpoints import atomic_dir

    return atomic_dir(Path(output) / SNAPSHOTS / f"step-{step:06d}",
                      lambda tmp: adapter_model.save_pretrained(tmp, safe_serialization=True),
                      is_complete=lambda p: (p / "adapter_config.json").exists())


def snapshot_callback(output: Path):
    """An HF TrainerCallback that keeps the adapter of every checkpoint the Trainer saves as a snapshot."""
    from transformers import TrainerCallback

    class KeepSnapshots(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero and model is not None:
                save_snapshot(model, output, state.global_step)

    return KeepSnapshots()


def log_history_stats(log_history: list[dict]) -> list[dict]:
    """An HF trainer's training log entries (one dict per logged step, numbers only): a method's `stats`."""
    return [{k: v for k, v in entry.items() if isinstance(v, (int, float))} for entry in log_history
            if "step" in entry and not any(k.startswith(("eval_", "train_runtime")) for k in entry)]


def latest_trainer_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest complete HF Trainer checkpoint (`checkpoint-N` with trainer_state.json) in a directory."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def step_of(path: str | None) -> int:
    """The step a checkpoint directory (`checkpoint-N`, `step-N`) was saved at; 0 for none."""
    return int(Path(path).name.split("-")[-1]) if path else 0


def adopt(checkpoint: Path, own_root: Path) -> Path:
    """Copy a checkpoint from another run (a Metaflow resume's origin) into this stage's own checkpoint
    directory, atomically, so that a resume of this run later still finds it if this run dies before saving."""
    from rlhf_lib.checkpoints import atomic_dir

    target = Path(own_root) / Path(checkpoint).name
    if Path(checkpoint).resolve() == target.resolve():
        return target
    return atomic_dir(target, lambda tmp: shutil.copytree(checkpoint, tmp, dirs_exist_ok=True))


def trainer_resume_point(resume_from: str | None, own_root: Path) -> str | None:
    """Where an HF-Trainer stage continues: the newest checkpoint of its own directory or of `resume_from`
    (a checkpoint, or a directory of them from an earlier run); None starts fresh."""
    own = latest_trainer_checkpoint(own_root)
    if resume_from and (Path(resume_from) / "trainer_state.json").exists():
        external = resume_from
    else:
        external = latest_trainer_checkpoint(Path(resume_from)) if resume_from else None
    if external and (not own or step_of(external) > step_of(own)):
        return str(adopt(Path(external), own_root))
    return own


def mirror_checkpoints_callback(checkpoint_uri: str, keep: int | None):
    """An HF TrainerCallback that stores each checkpoint at `checkpoint_uri` as soon as the Trainer has saved it."""
    from transformers import TrainerCallback

    from rlhf_lib import checkpoints

    class MirrorCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                checkpoints.publish(Path(args.output_dir) / f"checkpoint-{state.global_step}", checkpoint_uri, keep)

    return MirrorCheckpoints()


def train_resumable(trainer, stage: str, resume_from: str | None, output: Path, checkpoint_uri: str | None = None):
    """trainer.train() continued from the newest checkpoint of this stage's own directory or of `resume_from`
    (a retry, or a Metaflow resume's origin run), each new checkpoint also stored at `checkpoint_uri` when given.
    Returns (train output, the checkpoint resumed from)."""
    if checkpoint_uri:
        trainer.add_callback(mirror_checkpoints_callback(checkpoint_uri, trainer.args.save_total_limit))
    resume = trainer_resume_point(resume_from, Path(output) / "checkpoints")
    if resume:
        print(f"[{stage}] resuming from {resume}", flush=True)
    return trainer.train(resume_from_checkpoint=resume), resume


def save_trained(trainer, tokenizer, directory: Path) -> bool:
    """Save what an HF trainer trained (a model, or an adapter) and the tokenizer beside it, as safetensors.
    Every process must call it (saving synchronises them); True on the main process only."""
    trainer.save_model(str(directory))
    if not is_main_process():
        return False
    tokenizer.save_pretrained(directory)
    (Path(directory) / "training_args.bin").unlink(missing_ok=True)  # a pickle; nothing here needs it
    return True


def checkpoint_resume_point(resume_from: str | Path | None, own_root: Path, load, step_of
                            ) -> tuple[Path, dict] | None:
    """Where a stage with its own atomic checkpoints (ppo, rest) continues: the newest loadable checkpoint among
    this stage's own and those at `resume_from` (a `step-N` directory or a directory of them, e.g. a Metaflow
    resume's origin run), newest by `step_of(state)`. One from elsewhere is first copied into `own_root`, so a
    resume of *this* run still finds it if this run dies before its first save."""
    from rlhf_lib import checkpoints

    candidates = []
    own = checkpoints.latest_valid(own_root, load)
    if own:
        candidates.append(own)
    if resume_from is not None:
        resume_from = Path(resume_from)
        if checkpoints.marked_step(resume_from) is not None:
            try:
                candidates.append((resume_from, load(resume_from)))
            except Exception as err:
                print(f"warning: cannot load checkpoint {resume_from}: {err}", flush=True)
        else:
            external = checkpoints.latest_valid(resume_from, load)
            if external:
                candidates.append(external)
    if not candidates:
        return None
    path, state = max(candidates, key=lambda c: step_of(c[1]))
    if Path(path).parent.resolve() != Path(own_root).resolve():
        path = adopt(Path(path), Path(own_root))
    return path, state
