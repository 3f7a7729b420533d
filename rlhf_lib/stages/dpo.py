"""Direct Preference Optimization (Rafailov et al. 2023), TRL's DPOTrainer, on the preference pairs, from the merged
SFT model (the shared preference-stage shape: rlhf_lib/stages/preference.py).

    python -m rlhf_lib.stages.dpo --config run.json --output DIR \\
        --input sft_model=MERGED_SFT_DIR --input train=LAKE_URI --input eval=LAKE_URI

The loss pushes the policy's log-ratio to the reference (the SFT model: the same weights with the adapter off) up on
the chosen answer and down on the rejected one, tied to the reference by `dpo.beta`. Held-out figures: the implicit
reward's accuracy (chosen above rejected) and margin. DIR/checkpoints (HF Trainer checkpoints), DIR/adapter,
DIR/merged, DIR/result.json.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_lib.stages import hf, preference


def trainer(stage, model, tokenizer, train_pairs, eval_pairs):
    from trl import DPOConfig, DPOTrainer

    from rlhf_lib import models

    cfg, d = stage.cfg, stage.cfg.dpo
    args = DPOConfig(**hf.training_kwargs(cfg, d, "dpo", stage.out), beta=d.beta, loss_type=[d.loss_type],
                     max_length=d.max_length, truncation_mode="keep_end")
    return DPOTrainer(model=model, args=args, train_dataset=train_pairs, eval_dataset=eval_pairs,
                      processing_class=tokenizer, peft_config=models.lora_config(d.lora))


DPO = preference.PreferenceMethod(
    "dpo", trainer,
    metrics=lambda e: {"eval_reward_accuracy": e.get("eval_rewards/accuracies"),
                       "eval_reward_margin": e.get("eval_rewards/margins")},
    summary=lambda m: f"held-out implicit-reward accuracy {m['eval_reward_accuracy']}")


def main(argv: list[str] | None = None) -> Path:
    return preference.run(DPO, argv)


if __name__ == "__main__":
    main()
