"""Benchmark: wall time per step and the headline metrics of one RLHFFlow run.

    python bench/flow_timing.py                         # the default profile (configs/tiny.toml)
    python bench/flow_timing.py --config configs/compare.toml --plot docs/over_optimisation.png   # all five
    python bench/flow_timing.py --config configs/opt-1.3b.toml
    python bench/flow_timing.py --from-run RUN_ID --plot out.png   # the same report of a run made before
    python bench/flow_timing.py --watch-card ppo_train  # also read that step's live card while it runs

Runs the flow through metaflow.Runner, then reads each task's start/finish times and the run's metrics through
the Client API, and prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf_lib import env  # noqa: E402

env.configure()

import torch  # noqa: E402  (before metaflow's client, see tests/conftest.py)


def watch_new_run(step: str):
    """Start watching `step`'s card in the run about to start (the first RLHFFlow run newer than the latest now);
    returns (the states list the watcher fills, the event that keeps it running)."""
    import threading

    from metaflow import Flow, namespace

    from rlhf_lib import live

    namespace(None)

    def latest():
        try:
            return Flow("RLHFFlow").latest_run.id
        except Exception:  # no run yet
            return None

    before, running = latest(), threading.Event()
    running.set()

    found: list[str] = []

    def the_new_run():  # looked up until it exists (listing the runs costs), then kept
        if not found and (newest := latest()) != before:
            found.append(newest)
        return found[0] if found else None

    return live.watch_card(running.is_set, the_new_run, step), running


def markdown_table(headers: list[str], rows: list[list]) -> str:
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
                      *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)])


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.toml"))
    parser.add_argument("--plot", default=None, help="write the over-optimisation curve (PNG) here")
    parser.add_argument("--from-run", default=None, help="report on this finished run instead of starting one")
    parser.add_argument("--watch-card", default=None, metavar="STEP",
                        help="read STEP's card from the datastore once a second while it runs; report its states")
    return parser.parse_args(argv)


def run_or_find(args: argparse.Namespace):
    """(the run, its wall time or None for a finished run, the watched card's states) — a new run of the flow
    unless `--from-run` names a finished one."""
    from metaflow import Run, Runner, namespace

    if args.from_run:
        namespace(None)
        return Run(f"RLHFFlow/{args.from_run}"), None, []
    started, states = time.time(), []
    if args.watch_card:
        states, running = watch_new_run(args.watch_card)
    with Runner(str(ROOT / "flows" / "rlhf_flow.py"), show_output=False,
                config=[("config", str(Path(args.config).resolve()))]) as runner:
        result = runner.run()
        if result.status != "successful":  # the runner's log files are gone once its context ends
            sys.exit(f"run {result.run.id} failed:\n{result.stderr[-3000:]}")
    wall = time.time() - started
    if args.watch_card:
        running.clear()
    return result.run, wall, states


def print_timings(run, wall: float | None) -> None:
    from rlhf_lib import cpu

    print(f"## `{run.data.run_config['run']['name']}` — run {run.id}\n")
    print(f"Machine: {cpu.describe()}; torch {torch.__version__}\n")
    print("| step | seconds |\n|---|---|")
    for step in reversed(list(run)):
        task = step.task
        print(f"| {step.id} | {(task.finished_at - task.created_at).total_seconds():.1f} |")
    if wall is not None:
        print(f"| **whole run (wall)** | **{wall:.1f}** |")
    print()


def print_evaluation(data, plot: str | None) -> None:
    """The evaluation as the card shows it: the table, the over-optimisation curve and the guard."""
    from rlhf_lib import report as reporting

    accuracy = f"{data.reward_metrics['eval_accuracy']:.3f}" if data.reward_metrics else "— (a reward function)"
    print(f"Reward model held-out accuracy {accuracy}; SFT held-out loss {data.sft_metrics['eval_loss']:.3f}; "
          f"gold judge `{data.gold_judge}`. " + "; ".join(data.judges) + "\n")
    headers, rows = reporting.eval_table(data.eval_report)
    print(markdown_table(headers, rows))
    print("\n" + reporting.over_optimisation_note(data.eval_report))
    headers, rows = reporting.curve_table(data.eval_report)
    if not rows:
        return
    print("\nOver-optimisation curve (every saved checkpoint of each method that keeps snapshots, vs SFT):\n")
    print(markdown_table(headers, rows))
    headers, rows = reporting.guard_table(data.eval_report)
    print("\nThe guard (rlhf_lib/guard.py): each method with a curve at its last and its recommended checkpoint:\n")
    print(markdown_table(headers, rows))
    print("\n" + "\n".join(f"- {line}" for line in reporting.guard_lines(data.eval_report)))
    if plot:
        reporting.plot_over_optimisation(data.eval_report).savefig(plot, dpi=110)
        print(f"\n(plot: {plot})")


def print_methods(data) -> None:
    """What AI feedback, PPO and ReST report of their own training."""
    if data.rlaif_status == "done":
        m = data.rlaif_metrics
        print(f"\nAI feedback: kept {m['pairs_kept']} of {m['pairs_sampled']} judged pairs "
              f"({m['kept_fraction']:.1%}); position bias {m['position_bias']:.3f}; agreement with the sample "
              f"data's rule {m['agreement_with_rule']}")
    if data.ppo_status == "done":
        print(f"\nPPO mean score, first → last quarter of training: {data.ppo_metrics['score_first_quarter']:.2f} → "
              f"{data.ppo_metrics['score_last_quarter']:.2f}")
    if data.rest_status == "done":
        print("\nReST per Improve (grow, improve, threshold, kept fraction, mean reward all → kept):")
        for it in data.rest_iterations:
            print(f"- {it['grow']}.{it['improve']}: {it['threshold']:.2f}, {it['kept_fraction']:.2f}, "
                  f"{it['mean_reward_all']:.2f} → {it['mean_reward_kept']:.2f}")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    run, wall, states = run_or_find(args)
    print_timings(run, wall)
    if args.watch_card and not args.from_run:
        named = [max(map(int, found)) for state in states if (found := re.findall(r": \w+ (\d+) of \d+", state))]
        print(f"{args.watch_card}'s card read from the datastore while the step ran: {len(states)} distinct states, "
              f"naming steps {named}\n")
    print_evaluation(run.data, args.plot)
    print_methods(run.data)


if __name__ == "__main__":
    main()
