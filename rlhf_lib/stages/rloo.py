"""RLOO — REINFORCE Leave-One-Out (Ahmadian et al. 2024), TRL's RLOOTrainer, from the merged SFT model.

    python -m rlhf_lib.stages.rloo --config run.json --output DIR \\
        --input sft_model=MERGED_SFT_DIR --input reward_model=DIR --input prompts=LAKE_URI
    (or --input reward_function=function:module:fn in place of reward_model)

For each prompt, `rloo.num_generations` (k ≥ 2) completions are sampled and scored; the KL to the SFT model (the
same weights with the adapter switched off), times `beta`, is subtracted from each reward, and each completion's
baseline is the mean reward of the *other* k − 1 completions of its prompt — an unbiased REINFORCE estimator with
no value model. The policy is the merged SFT model with a fresh LoRA adapter. HF Trainer checkpoints (resumed from
on a retry or a Metaflow resume), the adapter at every checkpoint under DIR/snapshots (the evaluation's
over-optimisation curve), DIR/adapter, DIR/merged, DIR/result.json.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_lib.stages import trl_online


def main(argv: list[str] | None = None) -> Path:
    from trl import RLOOConfig, RLOOTrainer

    return trl_online.run("rloo", argv, RLOOTrainer, RLOOConfig, lambda g: dict(normalize_advantages=g.normalize_advantages))


if __name__ == "__main__":
    main()
