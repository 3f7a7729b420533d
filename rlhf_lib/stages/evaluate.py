"""Did alignment work? Compare SFT with every aligned policy on held-out prompts, with numbers.

    python -m rlhf_lib.stages.evaluate --config run.json --output DIR --input policy_sft=DIR \\
        --input policy_ppo=DIR [--input policy_<method>=DIR …] --input reward_model=DIR \\
        --input prompts=LAKE_URI --input sft_eval=LAKE_URI

For every policy: answers to the same held-out prompts (never used in training) with the same decoding and
seed, scored by the reward model the methods optimised (the *proxy*) and by a *gold* judge none of them trained
against (`eval.gold_judge`: the sample data's rule, a second reward model trained on the other half of the
pairs, or a judge LM under the constitution); perplexity on held-out SFT answers. For every aligned policy also:
win-rate over SFT by both judges (ties count half), an over-optimisation flag (proxy up, gold not), and
KL(policy ‖ SFT) on the policy's own answers, per token and per sequence.
Optional inputs: gold_reward_model=DIR, gold_judge_model=REF.
Writes DIR/eval_report.json, DIR/eval_samples.json and DIR/result.json.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlhf_lib import rl
from rlhf_lib.stages import common

BASELINE = "sft"


def perplexity(model, tokenizer, prompts: list[str], answers: list[str]) -> float:
    """exp(mean NLL per answer token) of held-out answers given their prompts."""
    responses = [tokenizer(" " + a.strip(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
                 for a in answers]
    responses = [torch.cat([r, torch.tensor([tokenizer.eos_token_id])]) for r in responses]
    lps = rl.response_logprobs(model, tokenizer, prompts, responses)
    total = sum(float(lp.sum()) for lp in lps)
    count = sum(len(lp) for lp in lps)
    return math.exp(-total / max(count, 1))


def win_rate(scores: torch.Tensor, baseline: torch.Tensor) -> float:
    """Fraction of prompts where `scores` beats the baseline; ties count half."""
    wins = (scores > baseline).float() + 0.5 * (scores == baseline).float()
    return float(wins.mean())


# Proxy win-rate this far above a coin flip while the gold judge's stays at or below it: the policy is
# pleasing the reward model it optimised, not the preference behind it (Gao et al. 2022).
OVEROPT_PROXY_MARGIN = 0.05


def over_optimised(proxy_win_rate: float, gold_win_rate: float | None) -> bool:
    return gold_win_rate is not None and proxy_win_rate > 0.5 + OVEROPT_PROXY_MARGIN and gold_win_rate <= 0.5


class GoldJudge:
    """The independent judge: scores answers (rule, second reward model) or compares them with SFT's (judge LM)."""

    def __init__(self, cfg, inputs: dict[str, str]):
        from rlhf_lib import judges, models

        self.kind, trust = cfg.gold_judge, cfg.run.trust_remote_code
        self.max_length = cfg.eval.reward_max_length
        if self.kind == "reward_model":
            ref = inputs.get("gold_reward_model")
            if not ref:
                raise SystemExit("eval gold judge `reward_model` needs --input gold_reward_model=DIR")
            self.model = models.load_reward_model(ref, trust).to(models.inference_device())
            self.tokenizer = models.load_tokenizer(ref, trust, padding_side="right")
        elif self.kind == "judge_model":
            ref = inputs.get("gold_judge_model") or cfg.eval.gold_judge_model
            self.judge = judges.PairwiseJudge.load(ref, cfg.rlaif.constitution_path, cfg.rlaif.max_length, trust)
            self.calibrate = cfg.rlaif.calibrate_position_bias

    def scores(self, prompts: list[str], answers: list[str]) -> torch.Tensor | None:
        from rlhf_lib import judges
        from rlhf_lib.scoring import score_responses

        if self.kind == "rule":
            return judges.rule_scores(answers)
        if self.kind == "reward_model":
            return score_responses(self.model, self.tokenizer, prompts, answers, self.max_length).cpu()
        return None  # a judge LM compares; it does not score

    def win_rate(self, questions, answers, baseline_answers, scores, baseline_scores) -> float:
        if scores is not None:
            return win_rate(scores, baseline_scores)
        labels, _ = self.judge.compare(questions, answers, baseline_answers, self.calibrate)
        return float(((labels == 1).float() + 0.5 * (labels == 0).float()).mean())


def main(argv: list[str] | None = None) -> Path:
    from rlhf_lib import models, tracking
    from rlhf_lib.data import formatting, lake
    from rlhf_lib.scoring import score_responses

    started, args, cfg, (reward_path, prompts_uri, sft_eval_uri), out = common.start(
        "evaluate", argv, "reward_model", "prompts", "sft_eval")
    policies = {k.removeprefix("policy_"): v for k, v in args.inputs.items() if k.startswith("policy_")}
    if BASELINE not in policies:
        raise SystemExit("evaluate needs --input policy_sft=DIR (the baseline)")
    e, trust = cfg.eval, cfg.run.trust_remote_code

    rows = list(lake.stream(prompts_uri, ["instruction", "input"], cfg.data.stream_batch_size))[: e.num_prompts]
    prompts = [formatting.rl_prompt(r) for r in rows]
    questions = [formatting.rl_question(r) for r in rows]
    held_out = list(lake.stream(sft_eval_uri, ["question", "response"]))
    reward_model = models.load_reward_model(reward_path, trust).to(models.inference_device())
    reward_tokenizer = models.load_tokenizer(reward_path, trust, padding_side="right")
    gold = GoldJudge(cfg, args.inputs)
    print(f"[evaluate] proxy judge: the reward model {reward_path}; gold judge: {gold.kind}", flush=True)

    # One load per policy: the baseline first, kept in memory as the reference for every other policy's KL.
    order = [BASELINE] + [n for n in policies if n != BASELINE]
    answers, scores, gold_scores, report = {}, {}, {}, {}
    sft_model = sft_tokenizer = None
    for name in order:
        model = models.load_causal_lm(policies[name], trust_remote_code=trust).to(models.inference_device()).eval()
        tokenizer = models.load_tokenizer(policies[name], trust)
        answers[name], tokens = rl.sample_answers(model, tokenizer, prompts, e.max_new_tokens, cfg.run.seed)
        scores[name] = score_responses(reward_model, reward_tokenizer, prompts, answers[name],
                                       e.reward_max_length).cpu()
        gold_scores[name] = gold.scores(prompts, answers[name])
        row = {"mean_score": float(scores[name].mean())}
        if gold_scores[name] is not None:
            row["mean_gold_score"] = float(gold_scores[name].mean())
        if name == BASELINE:
            sft_model, sft_tokenizer = model, tokenizer
        else:
            own = rl.response_logprobs(model, tokenizer, prompts, tokens)
            ref = rl.response_logprobs(sft_model, sft_tokenizer, prompts, tokens)
            seq_kl = [float((a - b).sum()) for a, b in zip(own, ref)]
            row["win_rate_vs_sft"] = win_rate(scores[name], scores[BASELINE])
            row["gold_win_rate_vs_sft"] = gold.win_rate(questions, answers[name], answers[BASELINE],
                                                        gold_scores[name], gold_scores[BASELINE])
            row["over_optimised"] = over_optimised(row["win_rate_vs_sft"], row["gold_win_rate_vs_sft"])
            row["kl_vs_sft"] = sum(seq_kl) / max(sum(len(a) for a in own), 1)
            row["kl_vs_sft_per_sequence"] = sum(seq_kl) / max(len(seq_kl), 1)
        row["perplexity"] = perplexity(model, tokenizer, [formatting.prompt(r["question"]) for r in held_out],
                                       [r["response"] for r in held_out])
        if name != BASELINE:
            del model
        report[name] = row
        print(f"[evaluate] {name}: mean score {row['mean_score']:.3f}, perplexity {row['perplexity']:.2f}",
              flush=True)
    samples = [
        {"prompt": prompts[i], **{f"{n}_answer": answers[n][i] for n in policies},
         **{f"{n}_score": float(scores[n][i]) for n in policies},
         **{f"{n}_gold_score": float(gold_scores[n][i]) for n in policies if gold_scores[n] is not None}}
        for i in range(min(e.num_samples_shown, len(prompts)))
    ]
    wandb_run = tracking.init_wandb(cfg, "evaluate")
    if wandb_run is not None:
        import wandb

        wandb_run.summary.update({f"{m}/{k}": v for m, vals in report.items() for k, v in vals.items()})
        if samples:
            wandb_run.log({"samples": wandb.Table(columns=list(samples[0]), data=[list(s.values()) for s in samples])})
        wandb_run.finish()
    common.atomic_write_json(out / "eval_report.json", report)
    common.atomic_write_json(out / "eval_samples.json", samples)
    result = common.write_result(out, "evaluate", started, eval_report=report, eval_samples=samples,
                                 num_prompts=len(prompts), gold_judge=gold.kind)
    for name, row in report.items():
        print(f"[evaluate] {name}: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in row.items()), flush=True)
    print(f"[evaluate] report: {out.resolve() / 'eval_report.json'}  ({result})", flush=True)
    return out


if __name__ == "__main__":
    main()
