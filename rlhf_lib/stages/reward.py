"""Reward-model training (TRL RewardTrainer, num_labels=1) on chosen/rejected preference pairs.

    python -m rlhf_lib.stages.reward --config run.json --output DIR \\
        --input base_model=PATH_OR_ID --input train=LAKE_URI --input eval=LAKE_URI

hh-rlhf transcripts (`\\n\\nHuman: …\\n\\nAssistant: …`) are rewritten in the policy's prompt format before
training (`data.prompt_format`: the seed's `Question: …\\n\\nAnswer: …`, or plain text), because PPO will ask this
model to score exactly that layout. Held-out accuracy is the fraction of eval pairs whose chosen text scores
above the rejected one. Writes DIR/model (safetensors + tokenizer) and DIR/result.json.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_lib import precision
from rlhf_lib.stages import contract, hf


def _setup_datasets(cfg, train_uri: str, eval_uri: str, part: tuple[int, int] | None = None):
    from rlhf_lib.data import formatting, lake

    fmt = cfg.data.prompt_format  # a string in the closure: `datasets` fingerprints the map by pickling it

    def to_pair(row):
        return {"chosen": formatting.preference_text(row["chosen"], fmt),
                "rejected": formatting.preference_text(row["rejected"], fmt)}

    cols, bs = ["chosen", "rejected"], cfg.data.stream_batch_size
    train = lake.to_hf_dataset(train_uri, cols, bs, to_pair)
    if part is not None:  # a disjoint share of the pairs: the gold reward model never sees the proxy's
        k, n = part
        train = train.select([i for i in range(len(train)) if i % n == k])
    return train, lake.to_hf_dataset(eval_uri, cols, bs, to_pair)


def pairwise_accuracy(model, tokenizer, pairs, max_length: int, batch_size: int = 32) -> dict[str, float]:
    """Fraction of (chosen, rejected) pairs ranked correctly (ties count half), and the mean score margin."""
    from rlhf_lib.scoring import score_texts

    chosen = score_texts(model, tokenizer, [p["chosen"] for p in pairs], max_length, batch_size)
    rejected = score_texts(model, tokenizer, [p["rejected"] for p in pairs], max_length, batch_size)
    from rlhf_lib.metrics import share_won

    margin = chosen - rejected
    return {"accuracy": share_won(margin > 0, margin == 0), "mean_margin": float(margin.mean()), "pairs": len(pairs),
            "ties": int((margin == 0).sum())}


def setup_trainer(run: contract.StageRun, base_model: str, train_uri: str, eval_uri: str):
    from trl import RewardConfig, RewardTrainer

    from rlhf_lib import models

    cfg, r = run.cfg, run.cfg.reward
    tokenizer = models.load_tokenizer(base_model, cfg.run.trust_remote_code, padding_side="right")
    model = models.load_reward_model(base_model, cfg.run.trust_remote_code, trained=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    train_ds, eval_ds = _setup_datasets(cfg, train_uri, eval_uri, run.args.part)
    reward_args = RewardConfig(**hf.training_kwargs(cfg, r, "reward", run.out), max_length=r.max_length)
    trainer = RewardTrainer(model=model, args=reward_args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer)
    # TRL drops pairs longer than max_length from training; say how many are left.
    run.say(f"training on {len(trainer.train_dataset)} of {len(train_ds)} pairs (TRL keeps those within "
            f"max_length={r.max_length} tokens)")
    return trainer, tokenizer, train_ds, eval_ds


def main(argv: list[str] | None = None) -> Path:
    run = contract.start("reward", argv, "base_model", "train", "eval")
    base_model, train_uri, eval_uri = run.paths
    trainer, tokenizer, train_ds, eval_ds = setup_trainer(run, base_model, train_uri, eval_uri)
    train_out, resume = hf.train_resumable(trainer, "reward", run.args.resume_from, run.out,
                                           run.args.checkpoint_uri)

    model_dir = run.out / "model"
    if not hf.save_trained(trainer, tokenizer, model_dir):
        return model_dir
    held_out = pairwise_accuracy(trainer.model, tokenizer, list(eval_ds), run.cfg.reward.max_length)
    metrics = {"train_loss": train_out.training_loss, "eval_accuracy": held_out["accuracy"],
               "eval_mean_margin": held_out["mean_margin"], "eval_pairs": held_out["pairs"],
               "eval_ties": held_out["ties"], "train_pairs": len(train_ds),
               "train_pairs_used": len(trainer.train_dataset), "steps": trainer.state.global_step,
               "precision": precision.record(trainer.model),
               "curves": hf.log_history_summary(trainer.state.log_history)}
    result = contract.write_result(run, model_path=str(model_dir.resolve()), base_model=base_model,
                                   checkpoint_dir=str((run.out / "checkpoints").resolve()), metrics=metrics,
                                   resumed_from=resume, part=list(run.args.part) if run.args.part else None)
    run.say(f"model: {model_dir.resolve()}  held-out accuracy={held_out['accuracy']:.3f} on {held_out['pairs']} "
            f"pairs  ({result})")
    return model_dir


if __name__ == "__main__":
    main()
