"""Plots and tables of a run, from its artifacts: shared by the Metaflow cards and the notebook."""

from __future__ import annotations

import sys

import matplotlib

if "ipykernel" not in sys.modules:  # cards render in a headless task; a notebook keeps its inline backend
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402


def _curve(curves: dict, *keys: str) -> tuple[list, list]:
    for key in keys:
        if curves.get(key):
            steps, values = zip(*curves[key])
            return list(steps), list(values)
    return [], []


def _plot_curves(curves: dict, series: tuple[tuple[str, str], ...], title: str, ylabel: str):
    """One line per (curve key, label); eval curves (few points) get markers."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in series:
        steps, values = _curve(curves, key)
        if steps:
            ax.plot(steps, values, marker="o" if key.startswith("eval_") else None, label=label)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    return fig, ax


def plot_sft_loss(sft_metrics: dict):
    fig, ax = _plot_curves(sft_metrics.get("curves", {}), (("loss", "train"), ("eval_loss", "held-out")),
                           "SFT loss", "loss")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_reward_accuracy(reward_metrics: dict):
    final = reward_metrics.get("eval_accuracy", float("nan"))
    fig, ax = _plot_curves(reward_metrics.get("curves", {}),
                           (("accuracy", "train batches"), ("eval_accuracy", "held-out pairs")),
                           f"Reward model accuracy (final held-out {final:.3f})", "pairwise accuracy")
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    return fig


PPO_PANELS = (("score_mean", "mean reward-model score"), ("kl", "KL per sequence (nats)"),
              ("beta", "KL coefficient β"), ("response_length_mean", "mean response length (tokens)"))


def plot_ppo(ppo_stats: list[dict], kl_target: float | None = None):
    fig, axes = plt.subplots(2, 2, figsize=(9, 5.5))
    steps = [s["step"] for s in ppo_stats]
    for ax, (key, title) in zip(axes.flat, PPO_PANELS):
        ax.plot(steps, [s[key] for s in ppo_stats])
        if key == "kl" and kl_target:
            ax.axhline(kl_target, color="grey", linestyle=":", label="adaptive target")
            ax.legend()
        ax.set(title=title, xlabel="PPO step")
    fig.tight_layout()
    return fig


def eval_table(eval_report: dict) -> tuple[list[str], list[list]]:
    """(headers, rows) of the evaluation report, one row per model."""
    keys = ["mean_score", "win_rate_vs_sft", "kl_vs_sft", "kl_vs_sft_per_sequence", "perplexity"]
    rows = [[name] + [("—" if k not in vals else f"{vals[k]:.3f}") for k in keys] for name, vals in eval_report.items()]
    return ["model"] + keys, rows


def samples_table(eval_samples: list[dict]) -> tuple[list[str], list[list]]:
    """(headers, rows) of sample generations, side by side with their scores."""
    if not eval_samples:
        return ["prompt"], []
    models = [k.removesuffix("_answer") for k in eval_samples[0] if k.endswith("_answer")]
    headers = ["prompt"] + [f"{m} answer (score)" for m in models]
    rows = [[s["prompt"]] + [f"{s[f'{m}_answer']} ({s[f'{m}_score']:.2f})" for m in models] for s in eval_samples]
    return headers, rows


def build_evaluate_card(card, run_data) -> None:
    """The evaluate step's card: training curves of every stage, the eval table, sample generations."""
    from metaflow.cards import Image, Markdown, Table

    card.append(Markdown("# RLHFFlow: did alignment work?"))
    headers, rows = eval_table(run_data.eval_report)
    card.append(Markdown("## Evaluation on held-out prompts"))
    card.append(Table(rows, headers=headers))
    card.append(Markdown("## Training curves"))
    card.append(Image.from_matplotlib(plot_sft_loss(run_data.sft_metrics)))
    card.append(Image.from_matplotlib(plot_reward_accuracy(run_data.reward_metrics)))
    card.append(Image.from_matplotlib(plot_ppo(run_data.ppo_stats, run_data.ppo_config.get("kl_target"))))
    card.append(Markdown("## Sample generations"))
    headers, rows = samples_table(run_data.eval_samples)
    card.append(Table(rows, headers=headers))
    plt.close("all")


def build_ppo_card(card, ppo_stats: list[dict], kl_target: float, resumed_from_step: int) -> None:
    from metaflow.cards import Image, Markdown

    note = f" (resumed from step {resumed_from_step})" if resumed_from_step else ""
    card.append(Markdown(f"# PPO: {len(ppo_stats)} steps{note}"))
    card.append(Image.from_matplotlib(plot_ppo(ppo_stats, kl_target)))
    plt.close("all")
