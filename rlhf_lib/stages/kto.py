"""KTO — Kahneman-Tversky Optimization (Ethayarajh et al. 2024), TRL's KTOTrainer, from the merged SFT model (the
shared preference-stage shape: rlhf_lib/stages/preference.py).

    python -m rlhf_lib.stages.kto --config run.json --output DIR \\
        --input sft_model=MERGED_SFT_DIR --input train=LAKE_URI --input eval=LAKE_URI

KTO learns from answers labelled desirable or undesirable, not from pairs: each preference pair becomes two
examples, its chosen answer desirable and its rejected one undesirable. The loss is a prospect-theory value of the
policy's log-ratio to the reference (the SFT model: the same weights with the adapter off) against a reference
point, the batch's KL to SFT estimated on mismatched prompt/answer pairs; `kto.desirable_weight` and
`kto.undesirable_weight` weigh the two sides. The adapter is kept at every checkpoint (DIR/snapshots), so the
evaluation's over-optimisation curve and the guard cover KTO. DIR/checkpoints, DIR/adapter, DIR/merged,
DIR/result.json.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_lib.stages import hf, preference


def unpaired(pairs):
    """Each pair as two labelled examples: {prompt, completion, label}, the chosen answer True (desirable)."""
    import datasets

    return datasets.Dataset.from_list([{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
                                       for p in pairs for side in ("chosen", "rejected")])


def trainer(stage, model, tokenizer, train_pairs, eval_pairs):
    from trl import KTOConfig, KTOTrainer

    from rlhf_lib import models

    cfg, k = stage.cfg, stage.cfg.kto
    args = KTOConfig(**hf.training_kwargs(cfg, k, "kto", stage.out), beta=k.beta, loss_type=k.loss_type,
                     desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight,
                     max_length=k.max_length)
    return KTOTrainer(model=model, args=args, train_dataset=unpaired(train_pairs), eval_dataset=unpaired(eval_pairs),
                      processing_class=tokenizer, peft_config=models.lora_config(k.lora))


KTO = preference.PreferenceMethod(
    "kto", trainer, snapshots=True,
    metrics=lambda e: {"eval_reward_margin": e.get("eval_rewards/margins"), "eval_kl": e.get("eval_kl")},
    summary=lambda m: f"held-out implicit-reward margin {m['eval_reward_margin']}")


def main(argv: list[str] | None = None) -> Path:
    return preference.run(KTO, argv)


if __name__ == "__main__":
    main()
