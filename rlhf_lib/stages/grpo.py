"""GRPO — Group Relative Policy Optimization (Shao et al. 2024), TRL's GRPOTrainer, from the merged SFT model.

    python -m rlhf_lib.stages.grpo --config run.json --output DIR \\
        --input sft_model=MERGED_SFT_DIR --input reward_model=DIR --input prompts=LAKE_URI
    (or --input reward_function=function:module:fn in place of reward_model)

For each prompt, `grpo.num_generations` completions are sampled from the policy and scored by the reward; each
completion's advantage is its reward relative to its group (minus the group mean, divided by the group's std with
`scale_rewards = "group"`): no value model, no critic. The clipped surrogate (`epsilon`) is taken over
`num_iterations` passes, with `beta` times the KL to the SFT model (the same weights with the adapter switched
off) in the loss. The policy is the merged SFT model with a fresh LoRA adapter. HF Trainer checkpoints (resumed
from on a retry or a Metaflow resume), the adapter at every checkpoint under DIR/snapshots (the evaluation's
over-optimisation curve), DIR/adapter, DIR/merged, DIR/result.json.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_lib.stages import trl_online


def main(argv: list[str] | None = None) -> Path:
    from trl import GRPOConfig, GRPOTrainer

    return trl_online.run("grpo", argv, GRPOTrainer, GRPOConfig,
                          lambda g: dict(loss_type=g.loss_type, scale_rewards=g.scale_rewards))


if __name__ == "__main__":
    main()
