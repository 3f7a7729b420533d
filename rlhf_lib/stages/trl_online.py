"""What GRPO and RLOO share: TRL's online trainers on the merged SFT model with a fresh LoRA adapter, rewarded by
the run's proxy reward, checkpointed and resumed like every HF-Trainer stage.

The reward is handed to TRL as a Python reward function that scores through `rlhf_lib.scoring.Reward` — the
reward model with its *own* tokenizer (or the configured `reward.function`) — exactly as PPO, ReST and the
evaluation score. TRL's built-in path for a reward *model* would tokenize `prompt + completion` with
`add_special_tokens=False` and no truncation: a DeBERTa reward model trained with [CLS]/[SEP] would then score
text in a shape it never saw.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_lib.stages import common


def prompts_dataset(prompts_uri: str, batch_size: int):
    """The RL training prompts as TRL's standard (non-conversational) `prompt` column."""
    import datasets

    from rlhf_lib.data import lake

    return datasets.Dataset.from_list([{"prompt": p} for p in lake.rl_prompts(prompts_uri, batch_size)])


def trl_reward_function(reward):
    """A `Reward` as a TRL reward function: (prompts, completions, **kwargs) -> list of floats."""

    def proxy(prompts, completions, **kwargs):
        return reward(list(prompts), list(completions)).float().cpu().tolist()

    return proxy


def quarter_means(stats: list[dict], key: str) -> tuple[float | None, float | None]:
    values = [s[key] for s in stats if isinstance(s.get(key), (int, float))]
    if not values:
        return None, None
    q = max(1, len(values) // 4)
    return sum(values[:q]) / q, sum(values[-q:]) / q


def run(name: str, argv: list[str] | None, make_trainer) -> Path:
    """The stage: `make_trainer(cfg, section, model, tokenizer, reward_fn, train_ds, out)` builds the TRL trainer
    (GRPOTrainer or RLOOTrainer) from the method's config section; the rest is common."""
    from rlhf_lib import models, scoring

    started, args, cfg, (sft_model, prompts_uri), out = common.start(name, argv, "sft_model", "prompts")
    section, trust = getattr(cfg, name), cfg.run.trust_remote_code
    model, tokenizer = models.policy_on_device(sft_model, trust, padding_side="left")
    reward = scoring.load_reward(args.inputs, section.reward_max_length, trust)
    train_ds = prompts_dataset(prompts_uri, cfg.data.stream_batch_size)
    print(f"[{name}] {len(train_ds)} prompts, {section.num_generations} completions each per group, "
          f"beta={section.beta}; reward: {reward.describe()}", flush=True)
    trainer = make_trainer(cfg, section, model, tokenizer, trl_reward_function(reward), train_ds, out)
    trainer.add_callback(common.snapshot_callback(out, args.checkpoint_uri))
    train_out, resume = common.train_resumable(trainer, name, args.resume_from, out, args.checkpoint_uri)

    adapter_dir = out / "adapter"
    if not common.save_trained(trainer, tokenizer, adapter_dir):
        return adapter_dir
    merged = models.merge_adapter(sft_model, str(adapter_dir), out / "merged", trust)
    stats = common.log_history_stats(trainer.state.log_history)
    first, last = quarter_means(stats, "reward")
    metrics = {"train_loss": train_out.training_loss, "steps": trainer.state.global_step,
               "reward_first_quarter": first, "reward_last_quarter": last, "prompts": len(train_ds),
               "curves": common.log_history_summary(trainer.state.log_history)}
    result = common.write_result(
        out, name, started, model_path=str(merged.resolve()), adapter_path=str(adapter_dir.resolve()),
        checkpoint_dir=str((out / "checkpoints").resolve()), snapshots_dir=str((out / common.SNAPSHOTS).resolve()),
        sft_model=sft_model, reward=reward.describe(), metrics=metrics, stats=stats, resumed_from=resume,
        resumed_from_step=common.step_of(resume))
    print(f"[{name}] model: {merged.resolve()}  mean reward first quarter {first} -> last quarter {last}  "
          f"({result})", flush=True)
    return out
