"""Direct Preference Optimization (TRL DPOTrainer) on the preference pairs, from the merged SFT model.

    python -m rlhf_lib.stages.dpo --config run.json --output DIR \\
        --input sft_model=MERGED_SFT_DIR --input train=LAKE_URI --input eval=LAKE_URI

The policy is the merged SFT model with a fresh LoRA adapter; the reference is the same model with the adapter
disabled (TRL does this for a PEFT model when no ref_model is given), so there is one copy of the weights.
Pairs are the reward stage's: hh-rlhf transcripts rewritten in the `Question: …\\n\\nAnswer: …` layout, split
into the shared prompt and the two completions. Writes DIR/adapter, DIR/merged (a standalone model),
DIR/checkpoints (HF Trainer checkpoints; resumed from on a retry or a Metaflow resume) and DIR/result.json.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_lib import checkpoints
from rlhf_lib import precision
from rlhf_lib.stages import contract, hf


def preference_to_dpo(row: dict) -> dict | None:
    """An hh-rlhf pair as DPO's {prompt, chosen, rejected}; None when the two texts do not share a prompt."""
    from rlhf_lib.data import formatting

    chosen = formatting.split_prompt_completion(formatting.hh_to_qa(row["chosen"]))
    rejected = formatting.split_prompt_completion(formatting.hh_to_qa(row["rejected"]))
    if chosen is None or rejected is None or chosen[0] != rejected[0]:
        return None
    return {"prompt": chosen[0], "chosen": chosen[1], "rejected": rejected[1]}


def _dataset(uri: str, batch_size: int):
    import datasets

    from rlhf_lib.data import lake

    rows = [r for r in map(preference_to_dpo, lake.stream(uri, ["chosen", "rejected"], batch_size)) if r]
    return datasets.Dataset.from_list(rows)


def setup_trainer(run: contract.StageRun, sft_model: str, train_uri: str, eval_uri: str):
    from trl import DPOConfig, DPOTrainer

    from rlhf_lib import models

    cfg, d = run.cfg, run.cfg.dpo
    model, tokenizer = models.policy_on_device(sft_model, cfg.run.trust_remote_code, padding_side="left")
    train_ds, eval_ds = _dataset(train_uri, cfg.data.stream_batch_size), _dataset(eval_uri, cfg.data.stream_batch_size)
    run.say(f"{len(train_ds)} training pairs, {len(eval_ds)} held-out pairs, beta={d.beta}")
    dpo_args = DPOConfig(**hf.training_kwargs(cfg, d, "dpo", run.out), beta=d.beta, loss_type=[d.loss_type],
                         max_length=d.max_length, truncation_mode="keep_end")
    trainer = DPOTrainer(model=model, args=dpo_args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, peft_config=models.lora_config(d.lora))
    return trainer, tokenizer, train_ds


def main(argv: list[str] | None = None) -> Path:
    run = contract.start("dpo", argv, "sft_model", "train", "eval")
    sft_model, train_uri, eval_uri = run.paths
    trainer, tokenizer, train_ds = setup_trainer(run, sft_model, train_uri, eval_uri)
    train_out, resume = hf.train_resumable(trainer, "dpo", run.args.resume_from, run.out, run.args.checkpoint_uri)
    eval_metrics = trainer.evaluate()

    adapter_dir = run.out / "adapter"
    if not hf.save_trained(trainer, tokenizer, adapter_dir):
        return adapter_dir
    metrics = {"train_loss": train_out.training_loss, "eval_loss": eval_metrics.get("eval_loss"),
               "eval_reward_accuracy": eval_metrics.get("eval_rewards/accuracies"),
               "eval_reward_margin": eval_metrics.get("eval_rewards/margins"), "train_pairs": len(train_ds),
               "steps": trainer.state.global_step, "curves": hf.log_history_summary(trainer.state.log_history),
               "precision": precision.record(trainer.model)}
    contract.finish_policy(run, adapter_dir, sft_model, snapshots=False, metrics=metrics,
                           summary=f"held-out implicit-reward accuracy {metrics['eval_reward_accuracy']}",
                           stats=hf.log_history_stats(trainer.state.log_history), resumed_from=resume,
                           resumed_from_step=checkpoints.step_of(resume) or 0)
    return run.out


if __name__ == "__main__":
    main()
