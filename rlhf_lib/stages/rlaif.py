"""RLAIF as a preference source: the SFT model answers twice, a judge model picks the better answer under a
constitution (Bai et al. 2022, Lee et al. 2023), and the reward model trains on the judged pairs.

    python -m rlhf_lib.stages.rlaif --config run.json --output DIR \\
        --input sft_model=MERGED_SFT_DIR --input judge_model=REF --input prompts=LAKE_URI

For each of `rlaif.num_prompts` training prompts, two completions are sampled from the SFT model. The judge
(any causal LM) reads the constitution, the question and both answers and we compare log p(" A") with
log p(" B"). Both orders are scored; a judge that always prefers the first slot is corrected by subtracting
its mean first-slot preference (`rlaif.calibrate_position_bias`), and a pair whose two orders still disagree
is dropped. Kept pairs are written in hh-rlhf form (`\\n\\nHuman: …\\n\\nAssistant: …`) as two Deep Lake
datasets, DIR/pairs-train and DIR/pairs-eval (the first `data.preference.eval_rows` — 64 when 0 — at most a fifth), which
the reward stage reads like human pairs. With the tiny profile's judge (a 1 M-parameter model) the labels are
close to noise — the point there is that the whole path runs, not the numbers.
"""

from __future__ import annotations

import random
from pathlib import Path

from rlhf_lib.stages import contract


def sample_pairs(model, tokenizer, rows: list[dict], max_new_tokens: int, seed: int, fmt: str = "qa") -> list[dict]:
    """Two sampled completions per prompt row; pairs whose two answers are the same text are left out."""
    from rlhf_lib import sampling
    from rlhf_lib.data import formatting

    prompts = [formatting.rl_prompt(r, fmt) for r in rows for _ in range(2)]
    sampler = sampling.TransformersSampler(model, tokenizer)
    answers, _ = sampling.sample_answers(sampler, prompts, max_new_tokens, seed=seed)
    pairs = []
    for i, row in enumerate(rows):
        x, y = answers[2 * i].strip(), answers[2 * i + 1].strip()
        if x != y:
            pairs.append({"question": formatting.rl_question(row), "x": x, "y": y})
    return pairs


def judge_pairs(run: contract.StageRun, judge_ref: str, pairs: list[dict]):
    """The judge's verdict on each pair, both orders, calibrated: (labels, position bias, raw order agreement)."""
    from rlhf_lib import judges

    a = run.cfg.rlaif
    judge = judges.PairwiseJudge.load(judge_ref, a.constitution_path, a.max_length, run.cfg.run.trust_remote_code)
    questions = [p["question"] for p in pairs]
    pref_ab = judge.first_slot_preference(questions, [p["x"] for p in pairs], [p["y"] for p in pairs])
    pref_ba = judge.first_slot_preference(questions, [p["y"] for p in pairs], [p["x"] for p in pairs])
    labels, bias = judges.decide(pref_ab, pref_ba, a.calibrate_position_bias)
    raw_agree = float(((pref_ab > 0) != (pref_ba > 0)).float().mean()) if len(pairs) else 0.0
    return labels, bias, raw_agree


def judged_pairs(pairs: list[dict], labels) -> list[dict]:
    """The pairs the judge decided, in hh-rlhf form (chosen first)."""
    from rlhf_lib.data import sample

    judged = []
    for pair, label in zip(pairs, labels.tolist()):
        if label == 0:
            continue
        chosen, rejected = (pair["x"], pair["y"]) if label == 1 else (pair["y"], pair["x"])
        judged.append({"chosen": sample.hh_format(pair["question"], chosen),
                       "rejected": sample.hh_format(pair["question"], rejected)})
    return judged


def agreement_with_rule(cfg, pairs: list[dict], labels) -> float | None:
    """How often the (calibrated) judge's verdict matches the sample data's generating rule: meaningful only on
    sample prompts, and only as a sanity figure for the judge."""
    import torch

    from rlhf_lib import judges

    if cfg.data.prompts.source != "sample" or not bool((labels != 0).any()):
        return None
    rule_label = torch.sign(judges.rule_scores([p["x"] for p in pairs]) - judges.rule_scores([p["y"] for p in pairs]))
    comparable = (labels != 0) & (rule_label != 0)
    if not comparable.any():
        return None
    return float((rule_label[comparable] == labels[comparable].float()).float().mean())


def main(argv: list[str] | None = None) -> Path:
    from rlhf_lib import models, tracking
    from rlhf_lib.data import lake

    run = contract.start("rlaif", argv, "sft_model", "judge_model", "prompts")
    (sft_model, judge_ref, prompts_uri), cfg, a = run.paths, run.cfg, run.cfg.rlaif
    rows = list(lake.stream(prompts_uri, ["instruction", "input"], cfg.data.stream_batch_size))
    rows = random.Random(f"rlaif-{cfg.run.seed}").sample(rows, min(a.num_prompts, len(rows)))
    policy, tokenizer = models.policy_on_device(sft_model, cfg.run.trust_remote_code, padding_side="left")
    pairs = sample_pairs(policy, tokenizer, rows, a.max_new_tokens, cfg.run.seed, cfg.data.prompt_format)
    del policy
    run.say(f"sampled {len(pairs)} distinct pairs from {len(rows)} prompts; judging with {judge_ref}")
    labels, bias, raw_agree = judge_pairs(run, judge_ref, pairs)
    judged = judged_pairs(pairs, labels)
    # One held-out pair, and at least two to train on for each reward model (the gold one takes half of them).
    needed = 1 + (4 if cfg.resolved_gold_judge == "reward_model" else 2)
    if len(judged) < needed:
        raise SystemExit(f"[rlaif] the judge's two orders agreed on {len(judged)} of {len(pairs)} pairs: too few to "
                         f"train the reward model(s) (this run needs {needed}). Raise rlaif.num_prompts or use a "
                         f"stronger rlaif.judge_model")
    n_eval = min(cfg.data.preference.carved_eval_rows, max(1, len(judged) // 5))
    eval_set = lake.write_rows(run.out / "pairs-eval", judged[:n_eval], ["chosen", "rejected"])
    train_set = lake.write_rows(run.out / "pairs-train", judged[n_eval:], ["chosen", "rejected"])
    metrics = {"prompts": len(rows), "pairs_sampled": len(pairs), "pairs_kept": len(judged),
               "kept_fraction": len(judged) / max(len(pairs), 1), "position_bias": bias,
               "orders_agree_uncalibrated": raw_agree, "train_pairs": train_set["rows"],
               "eval_pairs": eval_set["rows"], "agreement_with_rule": agreement_with_rule(cfg, pairs, labels)}
    with tracking.wandb_run(cfg, "rlaif") as wandb_run:
        if wandb_run is not None:
            wandb_run.summary.update({k: v for k, v in metrics.items() if v is not None})
    result = contract.write_result(run, train=train_set, eval=eval_set, judge_model=judge_ref,
                                   constitution=str(a.constitution_path), metrics=metrics)
    run.say(f"kept {len(judged)} of {len(pairs)} judged pairs (position bias {bias:.3f}); train {train_set['uri']}, "
            f"eval {eval_set['uri']}  ({result})")
    return run.out


if __name__ == "__main__":
    main()
