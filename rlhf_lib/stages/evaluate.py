"""Did alignment work? Compare SFT with every aligned policy on held-out prompts, with numbers.

    python -m rlhf_lib.stages.evaluate --config run.json --output DIR --input policy_sft=DIR \\
        [--input policy_<method>=DIR …] --input reward_model=DIR \\
        --input prompts=LAKE_URI --input sft_eval=LAKE_URI [--input snapshots_<method>=DIR …]

For every policy: answers to the same held-out prompts (never used in training) with the same decoding and
seed, scored by the reward the methods optimised (the *proxy*: the reward model, or `--input
reward_function=function:module:fn`) and by a *gold* judge none of them trained against (`eval.gold_judge`: the
sample data's rule, a second reward model trained on the other half of the pairs, a judge LM under the
constitution, or a function); perplexity on held-out SFT answers. For every aligned policy also: win-rate over SFT
by both judges (ties count half), an over-optimisation flag (proxy up, gold not), and KL(policy ‖ SFT) on the
policy's own answers, per token and per sequence. Each figure is a row of the metric table (rlhf_lib/metrics.py).

The over-optimisation curve (Gao et al. 2022): `snapshots_<method>` is a directory of `step-N` adapters a method
saved as it trained; each is put on the SFT model and scored the same way on the first
`eval.curve_prompts` prompts, so the report shows *where* along the KL axis a method's proxy win-rate parts from
its gold one, not only where it ended.
Optional inputs: gold_reward_model=DIR, gold_judge_model=REF.
Writes DIR/eval_report.json, DIR/eval_samples.json and DIR/result.json.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_lib import guard, metrics, sampling
from rlhf_lib.stages import contract

BASELINE = "sft"


class GoldJudge:
    """The independent judge: scores answers (rule, second reward model, function) or compares them with SFT's
    (judge LM)."""

    def __init__(self, cfg, inputs: dict[str, str]):
        from rlhf_lib import judges, scoring

        self.kind, trust = cfg.resolved_gold_judge, cfg.run.trust_remote_code
        self.reward = None
        if self.kind == "reward_model":
            ref = inputs.get("gold_reward_model")
            if not ref:
                raise SystemExit("eval gold judge `reward_model` needs --input gold_reward_model=DIR")
            self.reward = scoring.ModelReward(ref, cfg.eval.reward_max_length, trust)
        elif self.kind == "function":
            self.reward = scoring.FunctionReward(cfg.eval.gold_function,
                                                 context={"reference_model": inputs.get("policy_sft")})
        elif self.kind == "judge_model":
            ref = inputs.get("gold_judge_model") or cfg.eval.gold_judge_model
            self.judge = judges.PairwiseJudge.load(ref, cfg.rlaif.constitution_path, cfg.rlaif.max_length, trust)
            self.calibrate = cfg.rlaif.calibrate_position_bias

    def scores(self, prompts: list[str], answers: list[str]) -> torch.Tensor | None:
        from rlhf_lib import judges

        if self.kind == "rule":
            return judges.rule_scores(answers)
        if self.reward is not None:
            return self.reward(prompts, answers).cpu()
        return None  # a judge LM compares; it does not score

    def win_rate(self, questions, answers, baseline_answers, scores, baseline_scores) -> float:
        if scores is not None:
            return metrics.win_rate(scores, baseline_scores)
        labels, _ = self.judge.compare(questions, answers, baseline_answers, self.calibrate)
        return metrics.share_won(labels == 1, labels == 0)


class Judged:
    """One policy's answers to the held-out prompts, scored by both judges: what its metrics are computed from
    (rlhf_lib/metrics.py)."""

    def __init__(self, model, tokenizer, prompts, questions, proxy, gold, seed: int, max_new_tokens: int):
        self.model, self.tokenizer = model, tokenizer
        self.answers, self.tokens = sampling.sample_answers(sampling.TransformersSampler(model, tokenizer), prompts,
                                                            max_new_tokens, seed)
        self.scores = proxy(prompts, self.answers).cpu()
        self.gold_scores = gold.scores(prompts, self.answers)
        self.prompts, self.questions = prompts, questions

    def first(self, n: int) -> "Judged":
        """The same judged answers, of the first n prompts only."""
        import copy

        part = copy.copy(self)
        part.answers, part.tokens, part.scores = self.answers[:n], self.tokens[:n], self.scores[:n]
        part.gold_scores = None if self.gold_scores is None else self.gold_scores[:n]
        part.prompts, part.questions = self.prompts[:n], self.questions[:n]
        return part


def snapshots(directory: str | None) -> list[tuple[int, Path]]:
    """(step, adapter dir) of every complete `step-N` snapshot a method saved, oldest first; one without
    its marker is skipped, and said."""
    from rlhf_lib import checkpoints

    return checkpoints.complete_snapshots(directory, say="evaluate")


def curve(method: str, snaps: list[tuple[int, Path]], sft_ref: str, sft: Judged, proxy, gold: GoldJudge, cfg,
          progress=None) -> list[dict]:
    """The over-optimisation curve of one method: SFT (step 0, KL 0), then every saved snapshot, scored on the
    first eval.curve_prompts prompts (the curve's metrics: rlhf_lib/metrics.py)."""
    from peft import PeftModel

    from rlhf_lib import models

    n = min(cfg.eval.curve_prompts, len(sft.answers))
    first = sft.first(n)
    points = [metrics.curve_origin(metrics.Judging(first, sft, gold))]
    base, tokenizer = models.policy_on_device(sft_ref, cfg.run.trust_remote_code)
    model = None
    for step, path in snaps:
        name = f"step{step}"
        if model is None:
            model = PeftModel.from_pretrained(base, str(path), adapter_name=name).eval()
        else:
            model.load_adapter(str(path), adapter_name=name)
            model.set_adapter(name)
        judged = Judged(model, tokenizer, first.prompts, first.questions, proxy, gold, cfg.run.seed,
                        cfg.eval.max_new_tokens)
        points.append(point := metrics.curve_point(metrics.Judging(judged, sft, gold), step))
        print(f"[evaluate] {method} step {step}: " + ", ".join(
            f"{m.label} {m.show(point[m.key])}" for m in metrics.CURVE), flush=True)
        if progress is not None:
            progress.advance()
    del model, base
    return points


def held_out_prompts(cfg, prompts_uri: str) -> tuple[list[str], list[str]]:
    """(prompts as the policies see them, the questions in them) of the first eval.num_prompts held-out rows."""
    from rlhf_lib.data import formatting, lake

    rows = list(lake.stream(prompts_uri, ["instruction", "input"], cfg.data.stream_batch_size))[: cfg.eval.num_prompts]
    fmt = cfg.data.prompt_format
    return [formatting.rl_prompt(r, fmt) for r in rows], [formatting.rl_question(r) for r in rows]


def judge_policies(run: contract.StageRun, policies: dict[str, str], prompts, questions, proxy, gold,
                   progress=None) -> tuple[dict[str, Judged], dict[str, dict]]:
    """Every policy's answers, scored, and its report row: SFT first, kept as every other policy's KL reference."""
    from rlhf_lib import models
    from rlhf_lib.data import formatting, lake

    cfg, e = run.cfg, run.cfg.eval
    held_out = list(lake.stream(run.inputs["sft_eval"], ["question", "response"]))
    perplexity_on = ([formatting.prompt(r["question"], cfg.data.prompt_format) for r in held_out],
                     [r["response"] for r in held_out])
    judged: dict[str, Judged] = {}
    report: dict[str, dict] = {}
    for name in [BASELINE] + [n for n in policies if n != BASELINE]:  # one load per policy
        model, tokenizer = models.policy_on_device(policies[name], cfg.run.trust_remote_code)
        judged[name] = j = Judged(model, tokenizer, prompts, questions, proxy, gold, cfg.run.seed, e.max_new_tokens)
        report[name] = row = metrics.row(metrics.Judging(j, judged[BASELINE], gold, perplexity_on),
                                         baseline=name == BASELINE)
        if name != BASELINE:
            j.model = None  # keep SFT's model only: the KL reference
            del model
        run.say(f"{name}: " + ", ".join(f"{metrics.BY_KEY[k].label} {metrics.BY_KEY[k].show(v)}"
                                        for k, v in row.items()))
        if progress is not None:
            progress.advance()
    return judged, report


def sample_rows(judged: dict[str, Judged], prompts: list[str], shown: int) -> list[dict]:
    """The first `shown` prompts with every policy's answer and scores, side by side."""
    return [{"prompt": prompts[i], **{f"{n}_answer": j.answers[i] for n, j in judged.items()},
             **{f"{n}_score": float(j.scores[i]) for n, j in judged.items()},
             **{f"{n}_gold_score": float(j.gold_scores[i]) for n, j in judged.items() if j.gold_scores is not None}}
            for i in range(min(shown, len(prompts)))]


def log_to_wandb(cfg, report: dict, samples: list[dict]) -> None:
    from rlhf_lib import tracking

    with tracking.wandb_run(cfg, "evaluate") as wandb_run:
        if wandb_run is None:
            return
        import wandb

        wandb_run.summary.update({f"{m}/{k}": v for m, vals in report.items() for k, v in vals.items()
                                  if not isinstance(v, list)})
        if samples:
            wandb_run.log({"samples": wandb.Table(columns=list(samples[0]),
                                                  data=[list(s.values()) for s in samples])})


def main(argv: list[str] | None = None) -> Path:
    from rlhf_lib import scoring
    from rlhf_lib.progress import Progress
    from rlhf_lib.storage import atomic_write_json

    run = contract.start("evaluate", argv, "prompts", "sft_eval")
    policies = {k.removeprefix("policy_"): v for k, v in run.inputs.items() if k.startswith("policy_")}
    if BASELINE not in policies:
        raise SystemExit("evaluate needs --input policy_sft=DIR (the baseline)")
    cfg, e = run.cfg, run.cfg.eval
    prompts, questions = held_out_prompts(cfg, run.paths[0])
    proxy = scoring.load_reward(run.inputs, e.reward_max_length, cfg.run.trust_remote_code)
    gold = GoldJudge(cfg, run.inputs)
    run.say(f"proxy judge: {proxy.describe()}; gold judge: {gold.kind}")
    curves = {n: snapshots(run.inputs.get(f"snapshots_{n}")) if e.curve else [] for n in policies if n != BASELINE}
    # a model judged: each policy on the held-out prompts, then each checkpoint of each curve
    progress = Progress("evaluate", len(policies) + sum(map(len, curves.values())), unit="model", out=run.out)
    judged, report = judge_policies(run, policies, prompts, questions, proxy, gold, progress)
    for name in [n for n in judged if n != BASELINE]:
        snaps = curves[name]
        if snaps:
            report[name]["curve"] = curve(name, snaps, policies[BASELINE], judged[BASELINE], proxy, gold, cfg,
                                          progress)
            report[name]["guard"] = verdict = guard.guard(report[name]["curve"], e.kl_budget)
            run.say(f"{name}: {verdict['note']}")
    samples = sample_rows(judged, prompts, e.num_samples_shown)
    log_to_wandb(cfg, report, samples)
    atomic_write_json(run.out / "eval_report.json", report)
    atomic_write_json(run.out / "eval_samples.json", samples)
    result = contract.write_result(run, eval_report=report, eval_samples=samples, num_prompts=len(prompts),
                                   gold_judge=gold.kind, proxy=proxy.describe(),
                                   report_path=str((run.out / "eval_report.json").resolve()))
    for name, row in report.items():
        run.say(f"{name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in row.items() if not isinstance(v, list)))
    run.say(f"report: {run.out.resolve() / 'eval_report.json'}  ({result})")
    return run.out


if __name__ == "__main__":
    main()
