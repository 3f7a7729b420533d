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

from rlhf_lib import precision, progress
from rlhf_lib.stages import contract, hf


def prompts_dataset(prompts_uri: str, batch_size: int, fmt: str = "qa"):
    """The RL training prompts as TRL's standard (non-conversational) `prompt` column."""
    import datasets

    from rlhf_lib.data import lake

    return datasets.Dataset.from_list([{"prompt": p} for p in lake.rl_prompts(prompts_uri, batch_size, fmt)])


def trl_reward_function(reward, scored=None):
    """A `Reward` as a TRL reward function: (prompts, completions, **kwargs) -> list of floats. `scored(prompts,
    completions, scores)` is told of each batch (the live card's newest samples)."""

    def proxy(prompts, completions, **kwargs):
        scores = reward(list(prompts), list(completions)).float().cpu().tolist()
        if scored is not None:
            scored(prompts, completions, scores)
        return scores

    return proxy


def newest_samples(callback):
    """A `trl_reward_function` hook that notes a batch's first two samples in the stage's progress file."""

    def scored(prompts, completions, scores):
        if callback.progress is not None:
            callback.progress.note(samples=[{"prompt": p, "response": c, "score": round(s, 3)}
                                            for p, c, s in list(zip(prompts, completions, scores))[:2]])

    return scored


def quarter_means(stats: list[dict], key: str) -> tuple[float | None, float | None]:
    values = [s[key] for s in stats if isinstance(s.get(key), (int, float))]
    if not values:
        return None, None
    q = max(1, len(values) // 4)
    return sum(values[:q]) / q, sum(values[-q:]) / q


def make_trainer(trainer_class, config_class, section_args: dict, cfg, name: str, model, tokenizer, reward_fn,
                 train_ds, out: Path):
    """A TRL online trainer (GRPO, RLOO) from the method's section: the settings both share, pure sampling from
    the policy (top_k=0, top_p=1), no dropout, and `section_args` (the method's own)."""
    from rlhf_lib import models

    s = getattr(cfg, name)
    args = config_class(**hf.training_kwargs(cfg, s, name, out), num_generations=s.num_generations,
                        max_completion_length=s.max_completion_length, temperature=s.temperature, top_k=0, top_p=1.0,
                        beta=s.beta, epsilon=s.epsilon, num_iterations=s.num_iterations, disable_dropout=True,
                        **section_args)
    return trainer_class(model=model, reward_funcs=[reward_fn], args=args, train_dataset=train_ds,
                         processing_class=tokenizer, peft_config=models.lora_config(s.lora))


def run(name: str, argv: list[str] | None, trainer_class, config_class, section_args) -> Path:
    """The stage: TRL's `trainer_class` configured by `config_class` from the method's config section, with the
    method's own settings (`section_args(section)`); the rest is common."""
    from rlhf_lib import models, scoring

    stage = contract.start(name, argv, "sft_model", "prompts")
    (sft_model, prompts_uri), cfg, out = stage.paths, stage.cfg, stage.out
    section, trust = getattr(cfg, name), cfg.run.trust_remote_code
    model, tokenizer = models.policy_on_device(sft_model, trust, padding_side="left")
    reward = scoring.load_reward(stage.inputs, section.reward_max_length, trust)
    train_ds = prompts_dataset(prompts_uri, cfg.data.stream_batch_size, cfg.data.prompt_format)
    stage.say(f"{len(train_ds)} prompts, {section.num_generations} completions each per group, beta={section.beta}; "
              f"reward: {reward.describe()}")
    reporting = progress.hf_callback(name, out)
    trainer = make_trainer(trainer_class, config_class, section_args(section), cfg, name, model, tokenizer,
                           trl_reward_function(reward, newest_samples(reporting)), train_ds, out)
    trainer.add_callback(hf.snapshot_callback(out, stage.args.checkpoint_uri))
    train_out, resume = hf.train_resumable(trainer, name, stage.args.resume_from, out, stage.args.checkpoint_uri,
                                           progress_callback=reporting)

    stats = hf.log_history_stats(trainer.state.log_history)
    first, last = quarter_means(stats, "reward")
    metrics = {"train_loss": train_out.training_loss, "steps": trainer.state.global_step,
               "reward_first_quarter": first, "reward_last_quarter": last, "prompts": len(train_ds),
               "curves": hf.log_history_summary(trainer.state.log_history),
               "precision": precision.record(trainer.model)}
    return hf.finish_adapter(stage, trainer, tokenizer, sft_model, resume, snapshots=True, reward=reward.describe(),
                             metrics=metrics, stats=stats, summary=f"mean reward first quarter {first} -> last quarter {last}")
