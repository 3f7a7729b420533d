"""Benchmark: wall time per step and the headline metrics of one RLHFFlow run.

    python bench/flow_timing.py                         # the default profile (configs/tiny.toml)
    python bench/flow_timing.py --config configs/compare.toml   # PPO, DPO and ReST side by side
    python bench/flow_timing.py --config configs/opt-1.3b.toml

Runs the flow through metaflow.Runner, then reads each task's start/finish times and the run's metrics through
the Client API, and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf_lib import env  # noqa: E402

env.configure()

import torch  # noqa: E402  (before metaflow's client, see tests/conftest.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.toml"))
    args = parser.parse_args()
    from metaflow import Runner

    started = time.time()
    with Runner(str(ROOT / "flows" / "rlhf_flow.py"), show_output=False,
                config=[("config", str(Path(args.config).resolve()))]) as runner:
        result = runner.run()
    wall = time.time() - started
    run = result.run
    if result.status != "successful":
        sys.exit(f"run {run.id} failed:\n{result.stderr[-3000:]}")
    print(f"## `{Path(args.config).name}` — run {run.id}\n")
    print(f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"GPUs: {torch.cuda.device_count()}; torch {torch.__version__}\n")
    print("| step | seconds |\n|---|---|")
    for step in reversed(list(run)):
        task = step.task
        print(f"| {step.id} | {(task.finished_at - task.created_at).total_seconds():.1f} |")
    print(f"| **whole run (wall)** | **{wall:.1f}** |\n")
    from rlhf_lib import report as reporting

    data = run.data
    print(f"Reward model held-out accuracy {data.reward_metrics['eval_accuracy']:.3f}; SFT held-out loss "
          f"{data.sft_metrics['eval_loss']:.3f}; gold judge `{data.gold_judge}`.\n")
    headers, rows = reporting.eval_table(data.eval_report)
    print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print("\n" + reporting.over_optimisation_note(data.eval_report))
    if data.ppo_status == "done":
        print(f"\nPPO mean score, first → last quarter of training: {data.ppo_metrics['score_first_quarter']:.2f} → "
              f"{data.ppo_metrics['score_last_quarter']:.2f}")
    if data.rest_status == "done":
        print("\nReST per Improve (grow, improve, threshold, kept fraction, mean reward all → kept):")
        for it in data.rest_iterations:
            print(f"- {it['grow']}.{it['improve']}: {it['threshold']:.2f}, {it['kept_fraction']:.2f}, "
                  f"{it['mean_reward_all']:.2f} → {it['mean_reward_kept']:.2f}")


if __name__ == "__main__":
    main()
