"""What the offline preference methods share (DPO, KTO, and the next one): a TRL preference trainer on the merged SFT
model with a fresh LoRA adapter — the reference is the same model with the adapter switched off, one copy of the
weights — trained on the preference pairs, resumed from its newest checkpoint on a retry or a Metaflow resume, and
finished as every method that trains an adapter is (DIR/adapter, DIR/merged, DIR/result.json).

    python -m rlhf_lib.stages.<method> --config run.json --output DIR \\
        --input sft_model=MERGED_SFT_DIR --input train=LAKE_URI --input eval=LAKE_URI

The pairs are the reward model's: hh-rlhf transcripts in the run's prompt format (`data.prompt_format`), each split
into the shared prompt and its two completions ({prompt, chosen, rejected}). A method is a `PreferenceMethod`: the
TRL trainer it builds from its config section, the figures it reads from the trainer's held-out evaluation, and
whether it keeps its adapter at every checkpoint (DIR/snapshots: the over-optimisation curve and the guard).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rlhf_lib import precision
from rlhf_lib.stages import contract, hf


def pair(row: dict, fmt: str) -> dict | None:
    """A preference row as {prompt, chosen, rejected}; None when the two transcripts do not share a prompt."""
    from rlhf_lib.data import formatting

    chosen = formatting.preference_pair(row["chosen"], fmt)
    rejected = formatting.preference_pair(row["rejected"], fmt)
    if chosen is None or rejected is None or chosen[0] != rejected[0]:
        return None
    return {"prompt": chosen[0], "chosen": chosen[1], "rejected": rejected[1]}


def pairs_dataset(uri: str, cfg):
    """The pairs of a preference dataset as a Hugging Face dataset of {prompt, chosen, rejected}."""
    import datasets

    from rlhf_lib.data import lake

    fmt = cfg.data.prompt_format
    rows = lake.stream(uri, ["chosen", "rejected"], cfg.data.stream_batch_size)
    return datasets.Dataset.from_list([p for p in (pair(r, fmt) for r in rows) if p])


@dataclass(frozen=True)
class PreferenceMethod:
    name: str  # the registry's name: the config section, the stage
    trainer: Callable[..., Any]  # (stage, model, tokenizer, train pairs, held-out pairs) -> a TRL trainer
    metrics: Callable[[dict], dict]  # the trainer's held-out evaluation -> the method's own figures
    summary: Callable[[dict], str]  # the method's figures -> the line the stage ends with
    snapshots: bool = False  # its adapter at every checkpoint (DIR/snapshots)


def run(method: PreferenceMethod, argv: list[str] | None) -> Path:
    """The stage: pairs, trainer, training (resumable), held-out evaluation, the adapter merged and the result."""
    from rlhf_lib import models

    stage = contract.start(method.name, argv, "sft_model", "train", "eval")
    (sft_model, train_uri, eval_uri), cfg = stage.paths, stage.cfg
    model, tokenizer = models.policy_on_device(sft_model, cfg.run.trust_remote_code, padding_side="left")
    train_ds, eval_ds = pairs_dataset(train_uri, cfg), pairs_dataset(eval_uri, cfg)
    stage.say(f"{len(train_ds)} training pairs, {len(eval_ds)} held-out pairs")
    trainer = method.trainer(stage, model, tokenizer, train_ds, eval_ds)
    if method.snapshots:
        trainer.add_callback(hf.snapshot_callback(stage.out, stage.args.checkpoint_uri))
    train_out, resume = hf.train_resumable(trainer, method.name, stage.args.resume_from, stage.out,
                                           stage.args.checkpoint_uri)
    evaluated = trainer.evaluate()
    figures = {"train_loss": train_out.training_loss, "eval_loss": evaluated.get("eval_loss"),
               **method.metrics(evaluated), "train_pairs": len(train_ds), "steps": trainer.state.global_step,
               "curves": hf.log_history_summary(trainer.state.log_history),
               "precision": precision.record(trainer.model)}
    return hf.finish_adapter(stage, trainer, tokenizer, sft_model, resume, snapshots=method.snapshots,
                             metrics=figures, summary=method.summary(figures),
                             stats=hf.log_history_stats(trainer.state.log_history))
