"""This process's place among a stage's processes, and the few collectives a resume needs to agree on one
checkpoint (rlhf_lib/checkpoints.py). PPO's update has its own (rlhf_lib/stages/ppo/processes.py): tensors, not
objects."""

from __future__ import annotations

import os


class Ranks:
    """This process's place among the stage's processes (torch.distributed when it is initialized, else alone),
    and the few collectives a resume needs."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world = self.dist.get_world_size() if self.dist else 1
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.dist else 0

    def broadcast(self, value):
        if not self.dist:
            return value
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.dist:
            self.dist.barrier()

    def gather(self, value) -> list:
        if not self.dist:
            return [value]
        out = [None] * self.world
        self.dist.all_gather_object(out, value)
        return out
