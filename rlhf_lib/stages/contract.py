"""The stage contract shared by every `python -m rlhf_lib.stages.X` entry point.

Input: `--config run.json` (the run config as JSON), `--output DIR`, upstream paths as repeated
`--input name=path`, optionally `--resume-from ROOT` (repeatable) and `--checkpoint-uri`. Output: `DIR/result.json`,
written last and atomically, with the paths the stage produced, its metrics and the library versions; exit code 0
only when it is complete.

A stage reads like a recipe: `start` (arguments, config, seed, threads), its own setup, resume and training, then
`write_result` — or, for a method that trained an adapter on the SFT model, `finish_policy`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_FILE = "result.json"
FUNCTION_PREFIX = "function:"  # how a reward function travels as an --input value


def reward_input(reward_model_path: str | None, function: str) -> dict[str, str]:
    """The `--input` that names a stage's reward: `reward_function=function:module:fn` when a function is
    configured, else `reward_model=DIR` (read back by `rlhf_lib.scoring.load_reward`)."""
    if function:
        return {"reward_function": FUNCTION_PREFIX + function}
    return {"reward_model": reward_model_path}


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


@dataclass
class StageRun:
    """One run of a stage: its name, start time, parsed arguments, config, required inputs and output directory."""

    name: str
    started: float
    args: argparse.Namespace
    cfg: Any  # rlhf_lib.config.RunConfig
    paths: list[str]  # the required inputs, in the order `start` was asked for them
    out: Path

    @property
    def inputs(self) -> dict[str, str]:
        return self.args.inputs

    def say(self, message: str) -> None:
        print(f"[{self.name}] {message}", flush=True)


def _terminated(signum, _frame):
    raise SystemExit(128 + signum)


def start(stage: str, argv: list[str] | None, *required: str) -> StageRun:
    """The preamble every stage shares: arguments, config, required inputs, the seed and torch's CPU threads. A
    SIGTERM (a pod being evicted) ends the stage as an exception does, so an upload in progress aborts its
    multipart upload instead of leaving it open."""
    signal.signal(signal.SIGTERM, _terminated)
    started = time.time()
    args = parse_args(stage, argv)
    cfg = load_config(args.config)
    paths = require(args.inputs, *required)
    seed_everything(cfg.run.seed)
    import torch

    from rlhf_lib import precision

    plan = precision.use(cfg.run.precision)
    print(f"[{stage}] precision plan {plan.name} (run.precision = {cfg.run.precision}): frozen weights "
          f"{plan.frozen}, trained {plan.trained}, autocast {plan.autocast or 'off'}", flush=True)

    if not torch.cuda.is_available():
        from rlhf_lib import cpu

        threads = cpu.set_threads(cfg.run.cpu_threads)
        print(f"[{stage}] {threads} CPU thread(s) (run.cpu_threads = {cfg.run.cpu_threads or 'auto: the free cores'})",
              flush=True)
    return StageRun(stage, started, args, cfg, paths, Path(args.output))


def load_config(path: str):
    from rlhf_lib import config

    return config.validate(json.loads(Path(path).read_text()))


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


def write_result(run: StageRun, **payload: Any) -> Path:
    """`DIR/result.json`, last and atomically: the stage's outputs, its seconds, versions and peak memory."""
    from rlhf_lib.storage import atomic_write_json

    result = {"stage": run.name, "seconds": round(time.time() - run.started, 1), "versions": versions(),
              "peak_memory": peak_memory(), **payload}
    path = run.out / RESULT_FILE
    atomic_write_json(path, result)
    return path


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def finish_policy(run: StageRun, adapter_dir: Path, sft_model: str, *, snapshots: bool, summary: str,
                  **payload: Any) -> Path:
    """The tail of every method that trains an adapter on the merged SFT model, on the main process, after the
    adapter (and its tokenizer) is saved in `adapter_dir`: merge it into a standalone model (DIR/merged) and write
    the result — model, adapter, checkpoints (and snapshots) directories, the SFT model and `payload`."""
    from rlhf_lib import models

    out = run.out
    merged = models.merge_adapter(sft_model, str(adapter_dir), out / "merged", run.cfg.run.trust_remote_code)
    where = {"model_path": str(merged.resolve()), "adapter_path": str(Path(adapter_dir).resolve()),
             "checkpoint_dir": str((out / "checkpoints").resolve())}
    if snapshots:
        from rlhf_lib.checkpoints import SNAPSHOTS

        where["snapshots_dir"] = str((out / SNAPSHOTS).resolve())
    result = write_result(run, **where, sft_model=sft_model, **payload)
    run.say(f"model: {merged.resolve()}  {summary}  ({result})")
    return result
