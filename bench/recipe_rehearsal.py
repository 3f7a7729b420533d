"""The seed's recipe rehearsed at its real size on this machine, offline, from a fresh clone: OPT-1.3B and
DeBERTa-v3-base stand-ins (their published architectures, random weights, stored as the hub serves them: see
bench/standins.py) through every stage of configs/opt-1.3b-rehearsal.toml, with PPO killed (SIGKILL) after its first
checkpoint and the run resumed (`resume ppo`) from it.

    python bench/recipe_rehearsal.py                      # the CPU rehearsal (target: <= 45 min, <= 20 GiB)
    python bench/recipe_rehearsal.py --gpus N             # the same on a GPU machine (one process per GPU)
    python bench/recipe_rehearsal.py --tiny               # the same machinery with tiny stand-ins (a few minutes)

It checks itself and exits non-zero unless: the kill landed on PPO's own stage process after a complete checkpoint
(and that attempt did not finish), the resumed stage says it resumed from that step, the resumed run's artifacts
name its own PPO attempt, and no stage's measured peak RSS exceeds the memory model's prediction
(bench/memory_model.py) by more than 25 %. It writes rehearsal.json and rehearsal.md (every stage's seconds, peak
RSS beside the prediction, output sizes, killed_after_step, resumed_from_step, and any problem) into the results
folder its last line names. Stand-ins, data and runs go under --work (kept between runs: the full-size stand-ins
take a minute to build).
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
KILL_AFTER_STEP = 1  # PPO's first checkpoint
PEAK_TOLERANCE = 1.25  # a measured peak may exceed the model's prediction by at most 25 %
RUN_ID = re.compile(r"Workflow starting \(run-id (\w+)\)")


def prepare(args) -> tuple[Path, object]:
    """Stand-ins in `<work>/hub`, the data files and the config this rehearsal runs (the rehearsal config with its
    storage root and data under `work`, and run.gpus). Returns (config path, loaded config)."""
    import standins

    from rlhf_lib import config
    from rlhf_lib.data import sample

    work = Path(args.work)
    standins.build(work / "hub", size=args.size)
    raw = config.load(args.config).model_dump()
    raw["run"].update(storage_root=str(work / "store"), gpus=args.gpus)
    data = {"sft": sample.openorca_rows(256, "train", 0), "sft_eval": sample.openorca_rows(64, "eval", 0),
            "prompts": sample.alpaca_orca_rows(256, "train", 0)}
    for name, rows in data.items():
        path = work / "data" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw["data"]["sft"].update(source=str(work / "data" / "sft.jsonl"), eval_source=str(work / "data" / "sft_eval.jsonl"))
    raw["data"]["prompts"]["source"] = str(work / "data" / "prompts.jsonl")
    if args.gpus:
        raw["ppo"]["batch_size"] *= args.gpus  # PPO's global batch splits evenly over the processes
    if args.size == "tiny":  # a tiny random judge agrees with itself across the two orders on ~1 pair in 12
        raw["data"]["prompts"]["max_rows"], raw["rlaif"]["num_prompts"] = 256, 240
        raw["ppo"]["steps"] = 6  # a tiny step takes a fraction of a second: room for the kill before the end
        # The full-size floor (20 GB: bench/memory_model.py) is not what tiny stand-ins need (<1 GB): with it the
        # rehearsal refused to start on a machine with less room (CI, after the suite's other runs).
        raw["run"]["min_free_disk_gb"] = config.RunSection.model_fields["min_free_disk_gb"].default
        # PPO alone of the methods: what the rehearsal checks (the kill, the resume, the artifacts, the peaks) is PPO's
        # and every stage's before it; the other four methods' stages at tiny size cost CI ~45 s and are the flow
        # tests' (the full-size rehearsal runs them all)
        raw["run"]["methods"] = ["ppo"]
    path = work / "rehearsal.toml"
    path.write_text(config.dump_toml(raw))
    return path, config.load(path)


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
                self.peak = max(self.peak, sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.5)


def run_flow(args: list[str], env: dict, log: Path, store: Path | None = None) -> dict:
    """The flow command; with `store`, PPO's stage process is SIGKILLed as soon as its checkpoint of step
    KILL_AFTER_STEP is complete. Returns its exit code, run id, seconds, the peak RSS of its process tree (bytes)
    and, when the kill was sent, what it hit."""
    started, kill = time.time(), None
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(FLOW), *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
        peak = PeakRSS(proc.pid)
        peak.start()
        while proc.poll() is None:
            found = RUN_ID.search(log.read_text())
            if store is not None and kill is None and found:
                kill = kill_ppo_after_checkpoint(proc.pid, store / "RLHFFlow" / found.group(1))
            time.sleep(0.05 if store is not None and kill is None else 0.5)
        peak.running = False
    run_id = RUN_ID.search(log.read_text())
    return {"rc": proc.returncode, "run_id": run_id.group(1) if run_id else None, "seconds": time.time() - started,
            "peak": peak.peak, "kill": kill, "log": str(log)}


def kill_ppo_after_checkpoint(flow_pid: int, run_dir: Path) -> dict | None:
    """SIGKILL the PPO stage process under `flow_pid` once its checkpoint of KILL_AFTER_STEP is complete; what was
    killed, or None (not yet)."""
    complete = sorted(run_dir.glob(f"ppo/attempt-*/checkpoints/step-{KILL_AFTER_STEP:06d}/COMPLETE"))
    stage = stage_process(flow_pid, "ppo") if complete else None
    if stage is None:
        return None
    cmdline = " ".join(stage.cmdline())
    stage.send_signal(signal.SIGKILL)
    stage.wait(timeout=30)
    # What it had written when it died: the newest complete checkpoint is where a resume must continue from.
    attempt = complete[0].parent.parent.parent
    newest = max(int(m.parent.name.removeprefix("step-")) for m in attempt.glob("checkpoints/step-*/COMPLETE"))
    print(f"[rehearsal] killed PPO (pid {stage.pid}); its newest complete checkpoint: step {newest}", flush=True)
    return {"pid": stage.pid, "cmdline": cmdline, "attempt_dir": str(attempt), "step": newest}


# ------------------------------------------------------------------ the checks


def check_kill(first: dict, steps: int) -> list[str]:
    """The kill landed on PPO's own stage process after a complete checkpoint and before its last one (`steps`), and
    stopped that attempt."""
    kill = first["kill"]
    if kill is None:
        return [f"the kill did not land: PPO's stage process was never seen after its step-{KILL_AFTER_STEP} "
                f"checkpoint (run {first['run_id']}, exit code {first['rc']}){why_it_ended(first)}"]
    problems = [] if kill["step"] < steps else [
        f"the kill landed after PPO's last checkpoint (step {kill['step']} of {steps}): nothing was left to resume"]
    if "rlhf_lib.stages.ppo" not in kill["cmdline"]:
        problems.append(f"the killed process was not PPO's stage: {kill['cmdline'][:200]}")
    if first["rc"] == 0:
        problems.append(f"run {first['run_id']} succeeded although its PPO stage was killed")
    if (Path(kill["attempt_dir"]) / "result.json").exists():
        problems.append(f"the killed PPO attempt finished anyway: {kill['attempt_dir']}/result.json")
    return problems


def why_it_ended(run: dict) -> str:
    """A failed run's own last words (its log's last lines), for a failure message; empty when it succeeded."""
    if run["rc"] == 0 or not Path(run["log"]).exists():
        return ""
    lines = [line.strip() for line in Path(run["log"]).read_text(errors="replace").splitlines() if line.strip()]
    return f"; {run['log']} ends: " + " | ".join(lines[-4:])


def resumed_ppo(store: Path, run_id: str) -> tuple[dict, str]:
    """(the resumed run's PPO result.json, its stage log)."""
    (result,) = sorted((store / "RLHFFlow" / run_id).glob("ppo/attempt-*/result.json"))[-1:] or [None]
    if result is None:
        return {}, ""
    log = result.parent / "stage.log"
    return json.loads(result.read_text()), log.read_text() if log.exists() else ""


def check_resume(store: Path, second: dict, killed_after: int | None) -> tuple[int | None, list[str]]:
    """The resumed PPO stage says (its log and its result) that it resumed from the killed run's checkpoint."""
    result, log = resumed_ppo(store, second["run_id"])
    said = re.search(r"\[ppo\] resumed from step (\d+)", log)
    step = int(said.group(1)) if said else None
    problems = []
    if step is None:
        problems.append(f"the resumed PPO stage never said 'resumed from step N' (run {second['run_id']})")
    elif step != killed_after:
        problems.append(f"the resumed PPO stage resumed from step {step}, not the killed run's {killed_after}")
    if result.get("resumed_from_step") != step:
        problems.append(f"PPO's result records resumed_from_step {result.get('resumed_from_step')}, its log {step}")
    return step, problems


def check_artifacts(store: Path, second: dict) -> tuple[dict, list[str]]:
    """The resumed run's PPO artifacts name the resumed run's own PPO attempt."""
    from metaflow import Run, namespace

    namespace(None)
    data = Run(f"RLHFFlow/{second['run_id']}").data
    own = (store / "RLHFFlow" / second["run_id"] / "ppo").resolve()
    named = {key: getattr(data, key, None) for key in ("ppo_model_path", "ppo_adapter_path", "ppo_checkpoint_dir")}
    wrong = {k: v for k, v in named.items() if not v or not Path(v).resolve().is_relative_to(own)}
    return named, [f"the resumed run's {k} is {v}, not under its own PPO attempt {own}" for k, v in wrong.items()]


# ------------------------------------------------------------------ what was measured


def stage_rows(store: Path, origin: str, resumed: str, predicted: dict) -> list[dict]:
    """One row per step that ran (the origin's, then the resumed run's that were not cloned): seconds, each stage
    process's peak RSS (GB) and the memory model's prediction."""
    from metaflow import Run, namespace

    namespace(None)
    rows, done_in_origin = [], set()
    for run_id in (origin, resumed):
        for step in reversed(list(Run(f"RLHFFlow/{run_id}"))):
            task = step.task
            if task.finished_at is None or (run_id == resumed and step.id in done_in_origin):
                continue  # unfinished, or cloned by the resume
            if run_id == origin and task.successful:  # a failed step (the killed PPO) runs again in the resume
                done_in_origin.add(step.id)
            stage = {"ppo_train": "ppo", "ppo": None}.get(step.id, step.id)  # `ppo` only routes
            results = sorted((store / "RLHFFlow" / run_id).glob(f"{stage}/attempt-*/result.json")) + sorted(
                (store / "RLHFFlow" / run_id).glob(f"{stage}_gold/attempt-*/result.json")) if stage else []
            peaks = [json.loads(r.read_text()).get("peak_memory", {}).get("cpu_rss_gb") for r in results]
            rows.append({"step": step.id, "run": "origin" if run_id == origin else "resumed",
                         "seconds": round((task.finished_at - task.created_at).total_seconds(), 1),
                         "peak_rss_gb": [p for p in peaks if p is not None], "predicted_gb": predicted.get(stage)})
    return rows


def check_peaks(rows: list[dict]) -> list[str]:
    return [f"{r['step']} ({r['run']}): peak {p:.2f} GB exceeds the memory model's {r['predicted_gb']:.2f} GB by "
            f"more than {PEAK_TOLERANCE - 1:.0%}" for r in rows for p in r["peak_rss_gb"]
            if r["predicted_gb"] is not None and p > PEAK_TOLERANCE * r["predicted_gb"]]


def sizes(run_dir: Path) -> dict[str, float]:
    """GB written per stage output that matters for disk: merged models, checkpoints, snapshots."""
    out = {}
    for path in sorted(run_dir.glob("*/attempt-*/*")):
        if path.is_dir() and path.name in ("merged", "checkpoints", "snapshots", "model", "adapter"):
            gb = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9
            out[f"{path.parent.parent.name}/{path.parent.name}/{path.name}"] = round(gb, 3)
    return out


def markdown(summary: dict) -> str:
    """rehearsal.md: what BENCHMARKS.md includes."""
    lines = [f"Runs `{summary['runs']['origin']}` (PPO killed after step {summary['killed_after_step']}) and "
             f"`{summary['runs']['resumed']}` (resumed from step {summary['resumed_from_step']}); "
             f"{summary['machine']}; {summary['date']}; stand-ins: {summary['size']}.", "",
             "| step | run | seconds | stage peak RSS (GB) | memory model (GB) |", "|---|---|---|---|---|"]
    for r in summary["stages"]:
        peaks = ", ".join(f"{p:.2f}" for p in r["peak_rss_gb"]) or "—"
        model = f"{r['predicted_gb']:.2f}" if r["predicted_gb"] is not None and r["peak_rss_gb"] else "—"
        lines.append(f"| {r['step']} | {r['run']} | {r['seconds']:.1f} | {peaks} | {model} |")
    for name, wall in summary["walls"].items():
        lines.append(f"| **{name} (wall)** | | **{wall['seconds']:.1f}** | machine peak {wall['peak_gib']:.2f} GiB | |")
    large = {k: v for k, v in summary["sizes_gb"].items() if v >= 0.01}
    lines += ["", "Outputs of 0.01 GB or more (GB): " + ("; ".join(f"{k} {v}" for k, v in large.items()) or "none"), "",
              "Checks: " + ("all passed" if not summary["problems"] else "FAILED — " + "; ".join(summary["problems"]))]
    return "\n".join(lines) + "\n"


def write_results(folder: Path, summary: dict) -> None:
    from rlhf_lib.storage import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "rehearsal.json", summary)
    tmp = folder / ".rehearsal.md.tmp"
    tmp.write_text(markdown(summary))
    tmp.replace(folder / "rehearsal.md")


# ------------------------------------------------------------------ the command


def flows(args, cfg_path: Path, env: dict) -> tuple[dict, dict]:
    """The run with PPO killed after its first checkpoint, then `resume ppo` (one task at a time: each stage is
    timed alone and the machine's peak is one stage's)."""
    work, store = Path(args.work), Path(args.work) / "store"
    first = run_flow(["--config", "config", str(cfg_path), "run", "--max-workers", "1"], env, work / "run.log",
                     store=store)
    print(f"[rehearsal] run {first['run_id']} ended with exit code {first['rc']} after {first['seconds']:.0f} s",
          flush=True)
    # `resume` takes the origin run's config (Metaflow refuses --config with resume).
    second = run_flow(["resume", "ppo", "--origin-run-id", str(first["run_id"]), "--max-workers", "1"], env,
                      work / "resume.log")
    return first, second


def summarise(args, cfg, first: dict, second: dict) -> dict:
    import datetime

    import memory_model

    from rlhf_lib import cpu

    store = Path(args.work) / "store"
    problems = check_kill(first, cfg.ppo.steps)
    if second["rc"] != 0:
        problems.append(f"the resume failed (exit code {second['rc']}): see {Path(args.work) / 'resume.log'}")
        return {"problems": problems, "runs": {"origin": first["run_id"], "resumed": second["run_id"]},
                "size": args.size, "machine": cpu.describe(), "date": datetime.date.today().isoformat(),
                "killed_after_step": first["kill"]["step"] if first["kill"] else None, "kill": first["kill"],
                "resumed_from_step": None, "stages": [], "walls": {}, "sizes_gb": {}}
    resumed_from, more = check_resume(store, second, first["kill"]["step"] if first["kill"] else None)
    named, wrong = check_artifacts(store, second)
    predicted = memory_model.rehearsal_prediction(memory_model.parameter_counts(args.size), cfg)
    rows = stage_rows(store, first["run_id"], second["run_id"], predicted)
    return {"runs": {"origin": first["run_id"], "resumed": second["run_id"]}, "size": args.size,
            "machine": cpu.describe(), "date": datetime.date.today().isoformat(), "config": str(args.config),
            "killed_after_step": first["kill"]["step"] if first["kill"] else None, "kill": first["kill"],
            "resumed_from_step": resumed_from, "ppo_artifacts": named, "stages": rows,
            "walls": {name: {"seconds": round(r["seconds"], 1), "peak_gib": round(r["peak"] / 2**30, 2)}
                      for name, r in (("run", first), ("resume", second))},
            "sizes_gb": {f"{run_id} {k}": v for run_id in (first["run_id"], second["run_id"])
                         for k, v in sizes(store / "RLHFFlow" / run_id).items()},
            "problems": problems + more + wrong + check_peaks(rows)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--gpus", type=int, default=0, help="run.gpus (0: the CPU rehearsal)")
    parser.add_argument("--tiny", dest="size", action="store_const", const="tiny", default="full",
                        help="tiny stand-ins (the same ids, files and steps): the rehearsal's machinery in minutes")
    parser.add_argument("--work", default=None, help="stand-ins, data, runs and logs (default artifacts/rehearsal)")
    parser.add_argument("--results", default=None, help="the results folder (default <work>/results)")
    args = parser.parse_args(argv)
    args.work = str(Path(args.work or (WORK if args.size == "full" else WORK / "tiny")).resolve())
    started = time.time()
    cfg_path, cfg = prepare(args)
    env = {**os.environ, "HF_HUB_CACHE": str(Path(args.work) / "hub"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    print(f"[rehearsal] stand-ins ({args.size}) and data ready in {time.time() - started:.0f} s", flush=True)
    first, second = flows(args, cfg_path, env)
    summary = summarise(args, cfg, first, second)
    results = Path(args.results or Path(args.work) / "results")
    write_results(results, summary)
    for problem in summary["problems"]:
        print(f"[rehearsal] FAILED: {problem}", flush=True)
    print(f"[rehearsal] {'checks passed' if not summary['problems'] else 'checks FAILED'} in "
          f"{time.time() - started:.0f} s; results: {results / 'rehearsal.md'}, {results / 'rehearsal.json'}",
          flush=True)
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
