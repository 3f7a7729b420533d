"""The processes of one PPO stage (GPUs, or nodes) and the collectives its update runs over them: one process
computes what N compute together (rlhf_lib/stages/ppo/trainer.py says how)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Processes:
    """The stage's processes and the collectives PPO's update needs over them: `world` processes, this one `rank`,
    each holding a consecutive slice of every global rollout batch (rank r: rows [r*b, (r+1)*b) for b rollouts per
    process). One process (the default) needs no collective."""

    rank: int = 0
    world: int = 1

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over every process (a new tensor; `x` itself on one process)."""
        if self.world == 1:
            return x
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        return x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """`x` of every process, concatenated in rank order along the first dimension."""
        if self.world == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def gather_objects(self, obj) -> list:
        """`obj` of every process, in rank order (picklable objects, e.g. RNG states)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum_gradients(self, params: list[nn.Parameter]) -> None:
        """Sum each parameter's gradient over every process (one collective for all of them)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.reduce(torch.cat([g.reshape(-1) for g in grads]))
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
            p.grad = g.view_as(p).clone()
