"""PPO's prompt order: which prompts each step's rollouts answer, resumable from a checkpoint."""

from __future__ import annotations

import torch


class PromptOrder:
    """Deterministic, resumable prompt order: a seeded permutation per epoch; the cursor is the data position.

    With several processes, each takes its own slice of every global batch."""

    def __init__(self, prompts: list[str], seed: int, rank: int = 0, world: int = 1):
        self.prompts, self.seed, self.rank, self.world = prompts, seed, rank, world
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        return torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def next_batch(self, batch_size: int) -> list[str]:
        global_batch = []
        while len(global_batch) < batch_size * self.world:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            global_batch.append(self._order[self.cursor])
            self.cursor += 1
        mine = global_batch[self.rank * batch_size:(self.rank + 1) * batch_size]
        return [self.prompts[i] for i in mine]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)
