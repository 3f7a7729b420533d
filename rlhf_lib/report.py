"""Plots and tables of a run, from its artifacts: shared by the Metaflow cards and the notebook.

Every method of the registry (rlhf_lib/methods.py) appears in every table, plot and summary here without a line
of its own: a method's plot is the function its row names (PPO's and ReST's are shaped for their loops; the
default draws its logged training series), and its card, when it has one, shows that plot.
"""

from __future__ import annotations

import sys

import matplotlib

if "ipykernel" not in sys.modules:  # cards render in a headless task; a notebook keeps its inline backend
    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from rlhf_lib import guard, methods, metrics  # noqa: E402


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
    if not ax.lines:  # a stage that logged no curve (a run without logging steps): say so rather than draw axes
        ax.text(0.5, 0.5, "no curve recorded", ha="center", va="center", transform=ax.transAxes, color="grey")
    return fig, ax


def plot_sft_loss(sft_metrics: dict):
    fig, ax = _plot_curves(sft_metrics.get("curves", {}), (("loss", "train"), ("eval_loss", "held-out")),
                           "SFT loss", "loss")
    if ax.lines:
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


def plot_ppo(name: str, run_data):
    """PPO's four panels: mean reward, KL per sequence (with the adaptive controller's target), beta, length."""
    ppo_stats = getattr(run_data, f"{name}_stats")
    kl_target = (getattr(run_data, f"{name}_config") or {}).get("kl_target")
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


def plot_rest(name: str, run_data):
    """ReST per Improve: mean reward-model score of the whole Grow and of the kept part, and the kept fraction."""
    iterations = getattr(run_data, f"{name}_iterations")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    x = list(range(1, len(iterations) + 1))
    ax.plot(x, [it["mean_reward_all"] for it in iterations], marker="o", label="all samples of the Grow")
    ax.plot(x, [it["mean_reward_kept"] for it in iterations], marker="o", label="kept (above threshold)")
    ax.set(title="ReST: reward of grown samples", xlabel="Improve step")
    ax.legend()
    ax2.bar(x, [it["kept_fraction"] for it in iterations])
    ax2.set(title="ReST: kept fraction", xlabel="Improve step", ylim=(0, 1))
    fig.tight_layout()
    return fig


def eval_table(eval_report: dict) -> tuple[list[str], list[list]]:
    """(headers, rows) of the evaluation report: one row per model, SFT first, methods side by side; a column per
    metric of the table (rlhf_lib/metrics.py) that some row has."""
    shown = [m for m in metrics.TABLE if any(m.key in row for row in eval_report.values())]
    rows = [[name] + [_eval_cell(vals, m) for m in shown] for name, vals in eval_report.items()]
    return ["model"] + [m.label for m in shown], rows


def _eval_cell(row: dict, metric: metrics.Metric) -> str:
    if metric.key == metrics.OVER_OPTIMISED:  # one answer from both flags: at the end, and along the way (the guard's)
        after = _over_optimised_after(row)
        words = (["YES"] if row.get(metric.key) else []) + ([f"after step {after}"] if after is not None else [])
        return ", ".join(words) or metric.show(row.get(metric.key))
    return metric.show(row.get(metric.key))


def _over_optimised_after(row: dict) -> int | None:
    """The step after which the guard saw the gold fall while the proxy rose (None: not flagged, or no curve)."""
    return (row.get("guard") or {}).get("over_optimised_after")


def over_optimisation_note(eval_report: dict) -> str:
    flagged = [m for m, row in eval_report.items() if row.get(metrics.OVER_OPTIMISED)]
    turned = [f"{m} after step {_over_optimised_after(row)}" for m, row in eval_report.items()
              if _over_optimised_after(row) is not None]
    notes = []
    if flagged:
        notes.append("**Over-optimisation:** " + ", ".join(flagged) + " beat SFT by the reward they optimised but "
                     "not by the gold judge: they learned to please the proxy, not the preference behind it.")
    if turned:
        notes.append("**Over-optimised along the way:** " + ", ".join(turned) + " — the gold judge fell while the "
                     "proxy kept rising; ship the recommended checkpoint, not the last.")
    return " ".join(notes) or ("No method is flagged for over-optimisation (proxy up while the gold judge is not, "
                               "at the end or along the way).")


def samples_table(eval_samples: list[dict]) -> tuple[list[str], list[list]]:
    """(headers, rows) of sample generations, side by side with their proxy scores."""
    if not eval_samples:
        return ["prompt"], []
    models = [k.removesuffix("_answer") for k in eval_samples[0] if k.endswith("_answer")]
    headers = ["prompt"] + [f"{m} answer (score)" for m in models]
    rows = [[s["prompt"]] + [f"{s[f'{m}_answer']} ({s[f'{m}_score']:.2f})" for m in models] for s in eval_samples]
    return headers, rows


# ---------------------------------------------------------------- every method, from the registry

# Logged series worth a panel when a method has no plot of its own, in order of preference.
SERIES = (("reward", "mean reward"), ("score_mean", "mean reward"), ("kl", "KL to SFT"), ("loss", "loss"),
          ("rewards/margins", "implicit reward margin"), ("rewards/accuracies", "implicit reward accuracy"),
          ("completions/mean_length", "mean completion length"), ("entropy", "entropy"))


def plot_series(name: str, run_data):
    """Up to four of a method's logged series (`<method>_stats`: one dict per logged step) against the step."""
    title, stats = methods.get(name).title, getattr(run_data, f"{name}_stats", None) or []
    rows = [r for r in stats if isinstance(r.get("step"), (int, float))]
    panels = [(k, label) for k, label in SERIES if any(isinstance(r.get(k), (int, float)) for r in rows)][:4]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.2 * max(len(panels), 1), 2.8), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot(*zip(*points), marker="o" if len(points) < 12 else None)
        ax.set(title=label, xlabel="step")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_method(name: str, run_data):
    """A method's training curves: the plot its registry row names (`module:function(name, run_data)`)."""
    import importlib

    module, _, function = methods.get(name).plot.partition(":")
    return getattr(importlib.import_module(module), function)(name, run_data)


def plot_over_optimisation(eval_report: dict):
    """Gao et al. (2022) for every method with a curve: each saved checkpoint's gain over SFT by the gold judge (left)
    and by the proxy it optimised (right) against √KL(checkpoint ‖ SFT), points joined in order of KL; on the gold
    panel the fitted d(α − β ln d), its peak (dotted), and the guard's recommended checkpoint (a star, labelled
    with its step in the legend). A proxy that keeps climbing while the gold turns down is over-optimisation."""
    curves = [(n, r["curve"], r.get("guard")) for n, r in eval_report.items() if r.get("curve")]
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.0), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = ((axes[0][0], guard.gold_value, "gold judge (never trained against)"),
              (axes[0][1], guard.proxy_value, "proxy (the reward optimised)"))
    for i, (name, curve, verdict) in enumerate(curves):
        colour = colours[i % len(colours)]
        points = sorted(curve, key=lambda p: p[metrics.KL_PER_SEQUENCE])
        for ax, value, _ in panels:
            xy = [(guard.distance(p[metrics.KL_PER_SEQUENCE]), value(p, curve[0])) for p in points]
            xy = [(x, y) for x, y in xy if y is not None]
            if xy:  # the recommended step goes in the legend: labels inside the axes would overlap
                label = f"{name} (★ step {verdict['recommended_step']})" if verdict else name
                ax.plot(*zip(*xy), marker="o", markersize=4, color=colour, label=label)
        if verdict:
            _mark_guard(panels[0][0], curve, verdict, colour)
    for ax, _, title in panels:
        ax.axhline(0.0, color="grey", linestyle=":", linewidth=0.8)
        ax.set(title=f"gain over SFT: {title}", xlabel="√KL(checkpoint ‖ SFT)  (√nats per sequence)")
        ax.title.set_fontsize(9)
    axes[0][0].set_ylabel("mean score − SFT's (win-rate − 0.5 for a pairwise judge)")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle("Over-optimisation: every saved checkpoint vs SFT; ★ = recommended, dotted = fitted gold peak",
                 fontsize=10)
    fig.tight_layout()
    return fig


def _mark_guard(ax, curve: list[dict], verdict: dict, colour: str) -> None:
    """The fitted gold curve, its peak and the recommended checkpoint, on the gold panel."""
    fitted = verdict.get("fit")
    far = max(p[metrics.KL_PER_SEQUENCE] for p in curve)
    if fitted:
        peak = guard.peak_in_reach(fitted, curve)
        reach = max(far, fitted["peak_kl"] if peak else 0.0) * 1.1
        kls = [reach * k / 60 for k in range(61)]
        ax.plot([guard.distance(k) for k in kls], [guard.predict(fitted, k) for k in kls], color=colour, linewidth=0.8,
                alpha=0.6, linestyle="--")
        if peak:
            ax.axvline(guard.distance(fitted["peak_kl"]), color=colour, linestyle=":", linewidth=0.9)
    best = verdict["recommended"]
    y = guard.gold_value(best, curve[0])
    if y is not None:
        x = guard.distance(best[metrics.KL_PER_SEQUENCE])
        ax.plot([x], [y], marker="*", markersize=13, color=colour, markeredgecolor="black", zorder=5)


def guard_lines(eval_report: dict) -> list[str]:
    """The guard's verdict on each method with a curve, one line each (rlhf_lib/guard.py)."""
    return [f"{name}: {row['guard']['note']}" for name, row in eval_report.items() if row.get("guard")]


def guard_table(eval_report: dict) -> tuple[list[str], list[list]]:
    """(headers, rows): each method with a curve at its last and at its recommended checkpoint, by both judges."""
    proxy, gold, kl = (metrics.BY_KEY[k] for k in (metrics.PROXY_WIN_RATE, metrics.GOLD_WIN_RATE,
                                                   metrics.KL_PER_SEQUENCE))
    headers = ["method", "last step", f"{proxy.label} (last)", f"{gold.label} (last)", "recommended step",
               f"{proxy.label} (recommended)", f"{gold.label} (recommended)", f"{kl.label} (recommended)",
               "over-optimised after"]
    rows = []
    for name, row in eval_report.items():
        verdict = row.get("guard")
        if not verdict:
            continue
        last, best = row["curve"][-1], verdict["recommended"]
        after = verdict["over_optimised_after"]
        rows.append([name, last["step"], proxy.show(last[proxy.key]), gold.show(last.get(gold.key)), best["step"],
                     proxy.show(best[proxy.key]), gold.show(best.get(gold.key)), kl.show(best[kl.key]),
                     "—" if after is None else f"step {after}"])
    return headers, rows


def curve_table(eval_report: dict) -> tuple[list[str], list[list]]:
    """(headers, rows): every checkpoint of every method with a curve, with the curve's metrics (metrics.py)."""
    headers = ["method", "step"] + [m.label for m in metrics.CURVE]
    rows = [[name, p["step"]] + [m.show(p.get(m.key)) for m in metrics.CURVE]
            for name, row in eval_report.items() for p in row.get("curve") or []]
    return headers, rows


def stages_table(run_data) -> tuple[list[str], list[list]]:
    """(headers, rows): each stage and method, where its outputs and checkpoints are, and its headline metric."""
    reward_metric = (f"held-out accuracy {run_data.reward_metrics['eval_accuracy']:.3f}"
                     if run_data.reward_metrics else "(reward.function: no reward model)")
    rows = [["data", run_data.storage_root, "",
             f"{sum(d['rows'] for d in run_data.datasets.values())} rows in {len(run_data.datasets)} datasets"],
            ["sft", run_data.sft_adapter_path, run_data.sft_checkpoint_dir,
             f"held-out loss {run_data.sft_metrics['eval_loss']:.3f}"],
            ["merge", run_data.sft_merged_path, "", ""],
            ["reward", run_data.reward_model_path, run_data.reward_checkpoint_dir, reward_metric]]
    report = run_data.eval_report
    for name in methods.names():
        status = getattr(run_data, f"{name}_status", None)
        row = report.get(name)
        metric = metrics.summary_figures(row, report.get("sft", {})) if row else status
        rows.append([name, getattr(run_data, f"{name}_model_path", None),
                     getattr(run_data, f"{name}_checkpoint_dir", None), metric])
    return ["stage", "outputs", "checkpoints", "metric"], rows


def build_evaluate_card(card, run_data) -> None:
    """The evaluate step's card: methods side by side, the over-optimisation curve and check, training curves of
    every stage and method that ran, sample generations."""
    from metaflow.cards import Image, Markdown, Table

    card.append(Markdown("# RLHFFlow: did alignment work?"))
    headers, rows = eval_table(run_data.eval_report)
    card.append(Markdown(f"## SFT and every method on held-out prompts\nProxy: the reward the methods optimised. "
                         f"Gold: `{run_data.gold_judge}`, a judge no method trained against.\n\n"
                         + "; ".join(getattr(run_data, "judges", None) or [])))
    card.append(Table(rows, headers=headers))
    card.append(Markdown(over_optimisation_note(run_data.eval_report)))
    if any(row.get("curve") for row in run_data.eval_report.values()):
        card.append(Markdown("## Over-optimisation curve (Gao et al. 2022)\nEvery saved checkpoint of every online "
                             "method, scored on held-out prompts by the proxy and the gold judge, against its KL "
                             "from SFT."))
        card.append(Image.from_matplotlib(plot_over_optimisation(run_data.eval_report)))
        headers, rows = guard_table(run_data.eval_report)
        verdicts = "\n".join(f"- {line}" for line in guard_lines(run_data.eval_report))
        card.append(Markdown("### Which checkpoint to ship\n" + verdicts))
        card.append(Table(rows, headers=headers))
        headers, rows = curve_table(run_data.eval_report)
        card.append(Table(rows, headers=headers))
    card.append(Markdown("## Training curves"))
    card.append(Image.from_matplotlib(plot_sft_loss(run_data.sft_metrics)))
    if run_data.reward_metrics:
        card.append(Image.from_matplotlib(plot_reward_accuracy(run_data.reward_metrics)))
    for name in run_data.methods:
        card.append(Image.from_matplotlib(plot_method(name, run_data)))
    card.append(Markdown("## Sample generations"))
    headers, rows = samples_table(run_data.eval_samples)
    card.append(Table(rows, headers=headers))
    plt.close("all")


def build_method_card(card, run_data, name: str) -> None:
    """A method's own card (its row says `card=True`): its training curves, or that it was skipped."""
    from metaflow.cards import Image, Markdown

    if getattr(run_data, f"{name}_status") != methods.DONE:
        card.append(Markdown(f"# {name}: skipped (not in run.methods)"))
        return
    resumed = getattr(run_data, f"{name}_resumed_from_step")
    note = f" (resumed from step {resumed})" if resumed else ""
    card.append(Markdown(f"# {methods.get(name).title}: {len(getattr(run_data, f'{name}_stats'))} steps{note}"))
    card.append(Image.from_matplotlib(plot_method(name, run_data)))
    plt.close("all")


def summary(run_data) -> str:
    """The `end` step's text: where every output is and how every method of the registry did."""
    lines = ["RLHFFlow finished. Outputs:",
             f"  SFT adapter        {run_data.sft_adapter_path}",
             f"  SFT merged model   {run_data.sft_merged_path}"]
    if run_data.reward_model_path:
        lines.append(f"  reward model       {run_data.reward_model_path} "
                     f"(held-out accuracy {run_data.reward_metrics['eval_accuracy']:.3f})")
    if run_data.gold_reward_model_path:
        lines.append(f"  gold reward model  {run_data.gold_reward_model_path} "
                     f"(held-out accuracy {run_data.gold_reward_metrics['eval_accuracy']:.3f})")
    report = run_data.eval_report
    for method in methods.names():
        status = getattr(run_data, f"{method}_status", None)
        if status != methods.DONE:
            lines.append(f"  {method:<18} {status}")
            continue
        lines.append(f"  {method + ' model':<18} {getattr(run_data, f'{method}_model_path')}")
        lines.append(f"  {'':<18} {metrics.summary_figures(report[method], report['sft'])} "
                     f"(gold judge: {run_data.gold_judge})")
        if report[method].get("guard"):
            lines.append(f"  {'':<18} {report[method]['guard']['note']}")
            lines.append(f"  {'':<18} recommended checkpoint: {getattr(run_data, f'{method}_recommended_path', None)}")
    lines.append("  evaluation card    python flows/rlhf_flow.py card view evaluate")
    return "\n".join(lines)
