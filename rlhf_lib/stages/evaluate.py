"""Did alignment work? Compare SFT with every aligned policy on held-out prompts, with numbers.

    python -m rlhf_lib.stages.evaluate --config run.json --output DIR --input policy_sft=DIR \\
        --input policy_ppo=DIR [--input policy_<method>=DIR …] --input reward_model=DIR \\
        --input prompts=LAKE_URI --input sft_eval=LAKE_URI

For every policy: answers to the same held-out prompts (never used in training) with the same decoding and
seed, scored by the reward model; perplexity on held-out SFT answers. For every aligned policy also: win-rate
over SFT (ties count half) and KL(policy ‖ SFT) on the policy's own answers, per token and per sequence.
Writes DIR/eval_report.json, DIR/eval_samples.json and DIR/result.json.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlhf_lib.stages import common

BASELINE = "sft"


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int, batch_size: int = 16
                     ) -> tuple[list[str], list[torch.Tensor]]:
    """Sampled answers (top_k=0, top_p=1, stop at EOS) and their token ids, from a fixed seed."""
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    device = next(model.parameters()).device
    tokenizer.padding_side = "left"
    config = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    texts, token_ids = [], []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True).to(device)
        out = model.generate(**enc, generation_config=config)[:, enc["input_ids"].shape[1]:]
        for row in out:
            keep = row[row != tokenizer.pad_token_id]
            eos = (keep == tokenizer.eos_token_id).nonzero()
            if len(eos):
                keep = keep[: eos[0, 0] + 1]
            token_ids.append(keep.cpu())
            texts.append(tokenizer.decode(keep, skip_special_tokens=True))
    return texts, token_ids


@torch.no_grad()
def response_logprobs(model, tokenizer, prompts: list[str], responses: list[torch.Tensor]) -> list[torch.Tensor]:
    """log p(response token | prompt, earlier tokens) under `model`, one 1-D tensor per example."""
    from rlhf_lib.stages.ppo.losses import logprobs_from_logits
    from rlhf_lib.stages.ppo.rollout import position_ids

    device = next(model.parameters()).device
    out = []
    for prompt, response in zip(prompts, responses):
        p_ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0]
        ids = torch.cat([p_ids, response]).unsqueeze(0).to(device)
        am = torch.ones_like(ids)
        logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids(am)).logits
        P = len(p_ids)
        out.append(logprobs_from_logits(logits[:, P - 1:-1], ids[:, P:])[0].cpu())
    return out


def perplexity(model, tokenizer, prompts: list[str], answers: list[str]) -> float:
    """exp(mean NLL per answer token) of held-out answers given their prompts."""
    responses = [tokenizer(" " + a.strip(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
                 for a in answers]
    responses = [torch.cat([r, torch.tensor([tokenizer.eos_token_id])]) for r in responses]
    lps = response_logprobs(model, tokenizer, prompts, responses)
    total = sum(float(lp.sum()) for lp in lps)
    count = sum(len(lp) for lp in lps)
    return math.exp(-total / max(count, 1))


def win_rate(scores: torch.Tensor, baseline: torch.Tensor) -> float:
    """Fraction of prompts where `scores` beats the baseline; ties count half."""
    wins = (scores > baseline).float() + 0.5 * (scores == baseline).float()
    return float(wins.mean())


def main(argv: list[str] | None = None) -> Path:
    from rlhf_lib import models, tracking
    from rlhf_lib.data import formatting, lake
    from rlhf_lib.stages.ppo.rollout import score

    started, args, cfg, (reward_path, prompts_uri, sft_eval_uri), out = common.start(
        "evaluate", argv, "reward_model", "prompts", "sft_eval")
    policies = {k.removeprefix("policy_"): v for k, v in args.inputs.items() if k.startswith("policy_")}
    if BASELINE not in policies:
        raise SystemExit("evaluate needs --input policy_sft=DIR (the baseline)")
    e, trust = cfg.eval, cfg.run.trust_remote_code

    prompts = lake.rl_prompts(prompts_uri, cfg.data.stream_batch_size)[: e.num_prompts]
    held_out = list(lake.stream(sft_eval_uri, ["question", "response"]))
    reward_model = models.load_reward_model(reward_path, trust)
    reward_tokenizer = models.load_tokenizer(reward_path, trust, padding_side="right")

    # One load per policy: the baseline first, kept in memory as the reference for every other policy's KL.
    order = [BASELINE] + [n for n in policies if n != BASELINE]
    answers, scores, report = {}, {}, {}
    sft_model = sft_tokenizer = None
    for name in order:
        model = models.load_causal_lm(policies[name], trust_remote_code=trust).eval()
        tokenizer = models.load_tokenizer(policies[name], trust)
        answers[name], tokens = generate_answers(model, tokenizer, prompts, e.max_new_tokens, cfg.run.seed)
        scores[name] = score(reward_model, reward_tokenizer, prompts, answers[name], cfg.ppo.reward_max_length)
        row = {"mean_score": float(scores[name].mean()),
               "perplexity": perplexity(model, tokenizer, [formatting.prompt(r["question"]) for r in held_out],
                                        [r["response"] for r in held_out])}
        if name == BASELINE:
            sft_model, sft_tokenizer = model, tokenizer
        else:
            own = response_logprobs(model, tokenizer, prompts, tokens)
            ref = response_logprobs(sft_model, sft_tokenizer, prompts, tokens)
            seq_kl = [float((a - b).sum()) for a, b in zip(own, ref)]
            row = {"mean_score": row["mean_score"], "win_rate_vs_sft": win_rate(scores[name], scores[BASELINE]),
                   "kl_vs_sft": sum(seq_kl) / max(sum(len(a) for a in own), 1),
                   "kl_vs_sft_per_sequence": sum(seq_kl) / max(len(seq_kl), 1), "perplexity": row["perplexity"]}
            del model
        report[name] = row
        print(f"[evaluate] {name}: mean score {row['mean_score']:.3f}, perplexity {row['perplexity']:.2f}",
              flush=True)
    samples = [
        {"prompt": prompts[i], **{f"{n}_answer": answers[n][i] for n in policies},
         **{f"{n}_score": float(scores[n][i]) for n in policies}}
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
                                 num_prompts=len(prompts))
    for name, row in report.items():
        print(f"[evaluate] {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()), flush=True)
    print(f"[evaluate] report: {out.resolve() / 'eval_report.json'}  ({result})", flush=True)
    return out


if __name__ == "__main__":
    main()
