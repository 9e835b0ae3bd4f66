"""Which training groups each optimizer step and micro-batch takes: a pure function of the seed and the step.

One optimizer step consumes ``batch_groups x grad_accum x world_size`` groups; epoch ``e`` is a seeded
permutation of the training groups. A resumed run therefore needs only the step number to see exactly the
batches an uninterrupted run would have, whatever the process count it was split over.
"""

from __future__ import annotations

import math
from typing import List

import torch


class GroupSampler:
    """Indices of the training groups of a micro-batch, for ``num_groups`` groups.

    Process ``rank`` of ``world_size`` takes, in micro-batch ``micro`` of a step, the ``batch_groups`` groups
    at ``(micro * world_size + rank) * batch_groups`` of that step's slice of the epoch's permutation; the
    last groups of an epoch that do not fill a step are left out of it (another permutation next epoch).
    """

    def __init__(self, num_groups: int, batch_groups: int, grad_accum: int = 1, world_size: int = 1,
                 rank: int = 0, seed: int = 0) -> None:
        self.num_groups = num_groups
        self.batch_groups = batch_groups
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.global_groups = batch_groups * grad_accum * world_size
        self.steps_per_epoch = num_groups // self.global_groups
        if self.steps_per_epoch == 0:
            raise ValueError(f"{num_groups} training groups are fewer than one step's {self.global_groups} "
                             "(batch_groups x grad_accum x processes)")

    def total_steps(self, max_steps: int, num_epochs: float) -> int:
        """``max_steps`` when positive, else the steps of ``num_epochs`` epochs (at least one)."""
        return max_steps if max_steps > 0 else max(1, math.ceil(num_epochs * self.steps_per_epoch))

    def indices(self, step: int, micro: int) -> List[int]:
        """The groups of this process's micro-batch ``micro`` of optimizer step ``step`` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_groups, generator=generator).tolist()
        step_groups = order[index * self.global_groups:(index + 1) * self.global_groups]
        start = (micro * self.world_size + self.rank) * self.batch_groups
        return step_groups[start:start + self.batch_groups]
