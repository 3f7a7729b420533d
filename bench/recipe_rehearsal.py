"""The seed's recipe rehearsed at its real size on this machine, offline, from a fresh clone: OPT-1.3B and
DeBERTa-v3-base stand-ins (their published architectures, random weights, stored as the hub serves them: see
bench/standins.py) through every stage of configs/opt-1.3b-rehearsal.toml, with PPO killed (SIGKILL) after its first
checkpoint and the run resumed (`resume ppo`) from it. Prints, for BENCHMARKS.md, each step's wall time, each
stage's peak RSS, the sizes of what the stages wrote, checkpoint write and read times, and the machine's peak RSS.

    python bench/recipe_rehearsal.py                      # the CPU rehearsal (target: <= 45 min, <= 20 GiB)
    python bench/recipe_rehearsal.py --gpus N             # the same on a GPU machine (bf16, one process per GPU)

Stand-ins and data go under artifacts/rehearsal/ (kept between runs: the stand-ins take a minute to build).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rlhf_lib.launch import stage_process  # noqa: E402

CONFIG = ROOT / "configs" / "opt-1.3b-rehearsal.toml"
WORK = ROOT / "artifacts" / "rehearsal"
FLOW = ROOT / "flows" / "rlhf_flow.py"


def write_data(cfg) -> None:
    """The local data files the rehearsal config names, in the seed's schemas, from the sample generator."""
    from rlhf_lib.data import sample

    files = {cfg.data.sft.source: sample.openorca_rows(256, "train", 0),
             cfg.data.sft.eval_source: sample.openorca_rows(64, "eval", 0),
             cfg.data.prompts.source: sample.alpaca_orca_rows(256, "train", 0)}
    for name, rows in files.items():
        path = ROOT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


class PeakRSS(threading.Thread):
    """The largest resident memory of a process and all its children, sampled twice a second."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def run(self):
        import psutil

        while self.running:
            try:
                root = psutil.Process(self.pid)
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            time.sleep(0.5)


def run_flow(args: list[str], env: dict, log: Path, kill_after: Path | None = None) -> tuple[int, str, float, int]:
    """The flow command; with `kill_after`, PPO's stage process is SIGKILLed once that checkpoint is complete.
    Returns (exit code, run id, seconds, peak RSS of the whole process tree in bytes)."""
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(FLOW), *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        peak = PeakRSS(proc.pid)
        peak.start()
        killed = False
        while proc.poll() is None:
            text = log.read_text()
            found = re.search(r"Workflow starting \(run-id (\w+)\)", text)
            if kill_after and not killed and found:
                marker = ROOT / "artifacts" / "RLHFFlow" / found.group(1) / kill_after / "COMPLETE"
                stage = stage_process(proc.pid, "ppo") if marker.exists() else None
                if stage is not None:
                    stage.send_signal(signal.SIGKILL)
                    killed = True
                    print(f"[rehearsal] killed PPO (pid {stage.pid}) after {kill_after}", flush=True)
            time.sleep(0.5)
        peak.running = False
    text = log.read_text()
    run_id = re.search(r"Workflow starting \(run-id (\w+)\)", text).group(1)
    return proc.returncode, run_id, time.time() - started, peak.peak


def sizes(run_dir: Path) -> dict[str, float]:
    """GB written per stage output that matters for disk: merged models, checkpoints, snapshots."""
    out = {}
    for path in sorted(run_dir.glob("*/attempt-*/*")):
        if path.is_dir() and path.name in ("merged", "checkpoints", "snapshots", "model", "adapter"):
            gb = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9
            out[f"{path.parent.parent.name}/{path.parent.name}/{path.name}"] = round(gb, 3)
    return out


def report(origin: str, resumed: str, walls: dict, peaks: dict) -> None:
    from metaflow import Run, namespace

    namespace(None)
    print("\n| step | run | seconds | stage peak RSS (GB; on a GPU, its peak allocated) |\n|---|---|---|---|")
    done_in_origin = set()
    for run_id in (origin, resumed):
        run = Run(f"RLHFFlow/{run_id}")
        for step in reversed(list(run)):
            task = step.task
            if task.finished_at is None or (run_id == resumed and step.id in done_in_origin):
                continue  # unfinished, or cloned by the resume
            if run_id == origin:
                done_in_origin.add(step.id)
            # The stage a step runs (`ppo` is the switch step; its stage runs in ppo_train).
            stage = {"ppo_train": "ppo", "ppo": None}.get(step.id, step.id)
            results = sorted((ROOT / "artifacts" / "RLHFFlow" / run_id).glob(f"{stage}/attempt-*/result.json")) + \
                sorted((ROOT / "artifacts" / "RLHFFlow" / run_id).glob(f"{stage}_gold/attempt-*/result.json")) \
                if stage else []
            stage_peaks = [json.loads(r.read_text()).get("peak_memory", {}) for r in results]
            rss = ", ".join(f"{p['cpu_rss_gb']:.2f}" + (f" (GPU {p['gpu_gb']:.2f})" if "gpu_gb" in p else "")
                            for p in stage_peaks if "cpu_rss_gb" in p) or "—"
            print(f"| {step.id} | {'origin' if run_id == origin else 'resumed'} | "
                  f"{(task.finished_at - task.created_at).total_seconds():.1f} | {rss} |")
    for name, seconds in walls.items():
        print(f"| **{name} (wall)** | | **{seconds:.1f}** | machine peak RSS {peaks[name] / 2**30:.2f} GiB |")
    print("\nSizes (GB):")
    for run_id in (origin, resumed):
        for name, gb in sizes(ROOT / "artifacts" / "RLHFFlow" / run_id).items():
            print(f"- {run_id} {name}: {gb}")


def read_times(run_ids: tuple[str, ...]) -> None:
    """Seconds to read each stage's newest checkpoint back into memory (every file: safetensors, and torch's
    weights-only unpickler for optimizer and RNG states), the cost a resume pays before training."""
    import torch
    from safetensors.torch import load_file

    print("\nCheckpoint reads (the newest checkpoint of each stage, every file loaded):")
    for run_id in run_ids:
        for root in sorted((ROOT / "artifacts" / "RLHFFlow" / run_id).glob("*/attempt-*/checkpoints")):
            newest = max((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, default=None)
            if newest is None:
                continue
            started, size = time.time(), 0
            for path in newest.rglob("*"):
                if path.suffix == ".safetensors":
                    load_file(path)
                elif path.suffix in (".pt", ".pth", ".bin") and "args" not in path.name and "rng" not in path.name:
                    # weights and optimizer states (HF's training_args.bin is not read on resume; RNG states are
                    # kilobytes)
                    torch.load(path, map_location="cpu", weights_only=True)
                else:
                    continue
                size += path.stat().st_size
            print(f"- {root.parent.parent.name}: {newest.name} ({size / 1e6:.0f} MB) read in "
                  f"{time.time() - started:.2f} s")


def checkpoint_times(logs: list[Path]) -> None:
    print("\nCheckpoint writes and reads (from the stage logs):")
    for log in logs:
        for line in log.read_text().splitlines():
            if re.search(r"(written|read) in [0-9.]+ s", line):
                print("- " + line.split("] ", 1)[-1][:200])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=0, help="run.gpus (0: the CPU rehearsal)")
    parser.add_argument("--origin-run-id", help="skip the first run: resume this one (its PPO was killed)")
    args = parser.parse_args()
    import standins

    from rlhf_lib import config

    started = time.time()
    cfg = config.load(CONFIG)
    WORK.mkdir(parents=True, exist_ok=True)
    revisions = standins.build(WORK / "hub")
    write_data(cfg)
    cfg_path = CONFIG
    if args.gpus:
        raw = cfg.model_dump()
        raw["run"]["gpus"] = args.gpus
        raw["ppo"]["batch_size"] *= args.gpus  # PPO's global batch splits evenly over the processes
        cfg_path = WORK / "rehearsal-gpu.toml"
        cfg_path.write_text(config.dump_toml(raw))
    env = {**os.environ, "HF_HUB_CACHE": str(WORK / "hub"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    print(f"[rehearsal] stand-ins {revisions} and data ready in {time.time() - started:.0f} s", flush=True)
    # One task at a time (--max-workers 1): each stage is timed alone, and the machine's peak is one stage's.
    if args.origin_run_id:
        first = (1, args.origin_run_id, float("nan"), 0)
    else:
        first = run_flow(["--config", "config", str(cfg_path), "run", "--max-workers", "1"], env, WORK / "run.log",
                         kill_after="ppo/attempt-0/checkpoints/step-000001")
        print(f"[rehearsal] run {first[1]} ended with exit code {first[0]} after {first[2]:.0f} s "
              f"(PPO killed after its first checkpoint)", flush=True)
    # `resume` takes the origin run's config (Metaflow refuses --config with resume).
    second = run_flow(["resume", "ppo", "--origin-run-id", first[1], "--max-workers", "1"], env, WORK / "resume.log")
    if second[0] != 0:
        sys.exit(f"[rehearsal] resume failed: see {WORK / 'resume.log'}")
    from rlhf_lib import cpu

    print(f"\n## Recipe rehearsal — OPT-1.3B / DeBERTa-v3-base stand-ins, runs {first[1]} and {second[1]}")
    print(f"Machine: {cpu.describe()}")
    report(first[1], second[1], {"run": first[2], "resume": second[2]}, {"run": first[3], "resume": second[3]})
    checkpoint_times([WORK / "run.log", WORK / "resume.log"])
    read_times((first[1], second[1]))
    print(f"\n[rehearsal] everything in {time.time() - started:.0f} s; logs {WORK}/run.log, {WORK}/resume.log; "
          f"outputs under {ROOT / 'artifacts' / 'RLHFFlow'}")


if __name__ == "__main__":
    main()
