"""One PPO step on a fixed rollout batch, as one process of a layout (see tests/test_ppo_layout.py).

    python tests/ppo_layout_worker.py ROLLOUT.pt OUT.pt MINI_BATCH ACCUMULATION          # one process
    python -m torch.distributed.run --nproc_per_node 2 tests/ppo_layout_worker.py ...     # two, over gloo

Each process builds the same float64 policy (seeded), takes its slice of the global batch, runs `ppo_step` and
rank 0 writes the trainable parameters, the stats and the KL coefficient afterwards.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def build_policy(model_path: str):
    """The tiny policy in float64 with a LoRA adapter and a value head, all initialised from fixed seeds (the
    adapter's B and the value head randomised, so both matter from the first step)."""
    from peft import get_peft_model

    from rlhf_lib import models
    from rlhf_lib.config import LoraSection
    from rlhf_lib.stages.ppo.policy import PolicyWithValueHead

    torch.manual_seed(0)
    base = models.load_causal_lm(model_path).double()
    lm = get_peft_model(base, models.lora_config(LoraSection(r=4, alpha=8, dropout=0.0)))
    policy = PolicyWithValueHead(lm, base.config.hidden_size).double().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if param.requires_grad and ("lora_B" in name or "v_head" in name):
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.05)
    return policy


def main() -> None:
    rollout_path, out_path, mini, accumulation = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)

    from rlhf_lib.config import PPOSection
    from rlhf_lib import sampling
    from rlhf_lib.stages.ppo import losses, trainer
    from rlhf_lib.stages.ppo.processes import Processes
    from rlhf_lib.stages.ppo import policy as policy_module

    data = torch.load(rollout_path, weights_only=True)
    policy = build_policy(data["model_path"])
    b = len(data["input_ids"]) // world
    rows = slice(rank * b, (rank + 1) * b)
    batch = sampling.RolloutBatch(data["input_ids"][rows], data["attention_mask"][rows], data["response_mask"][rows],
                                 int(data["prompt_length"]), data["scores"][rows])
    p = PPOSection(batch_size=len(data["input_ids"]), mini_batch_size=mini, gradient_accumulation_steps=accumulation,
                   ppo_epochs=2, learning_rate=1e-3, init_kl_coef=0.2, kl_target=6.0, kl_horizon=100)
    optimizer = torch.optim.Adam(policy_module.trainable_parameters(policy), lr=p.learning_rate)
    kl_ctl = losses.AdaptiveKLController(p.init_kl_coef, p.kl_target, p.kl_horizon)
    stats = trainer.ppo_step(policy, optimizer, batch, kl_ctl, p, processes=Processes(rank, world), shuffle_seed=7)
    if rank == 0:
        params = {n: q.detach().clone() for n, q in policy.named_parameters() if q.requires_grad}
        torch.save({"params": params, "stats": stats, "beta": kl_ctl.value}, out_path)
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
