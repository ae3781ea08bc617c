"""Which samples each rank reads at each step: one global order from (seed, epoch), cut per rank.

Global batch `step` is positions perm_e[k*G : (k+1)*G], with e = step // steps_per_epoch, k the step within
the epoch and perm_e a permutation of all N samples drawn from (seed, e). Rank r takes the r-th contiguous
slice of b = G / world_size. The union over ranks depends only on (seed, step, G), never on world_size,
so a run resumed on a different number of GPUs with the same global batch sees exactly the same data.
The N mod G samples left at the end of an epoch (different ones each epoch) are dropped, so every step
has a full global batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


def steps_per_epoch(num_samples: int, global_batch_size: int) -> int:
    return num_samples // global_batch_size


@functools.lru_cache(maxsize=2)  # the current epoch and, at a boundary, the next
def epoch_permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
    perm.flags.writeable = False  # shared through the cache
    return perm


@dataclass(frozen=True)
class BatchOrder:
    num_samples: int
    global_batch_size: int
    rank: int
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        if self.global_batch_size % self.world_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not divisible by world_size "
                             f"{self.world_size}; choose a global batch that is a multiple of the world size")
        if self.num_samples < self.global_batch_size:
            raise ValueError(f"the dataset has {self.num_samples} samples, fewer than one global batch of "
                             f"{self.global_batch_size}; lower global_batch_size")

    @property
    def per_rank_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_samples, self.global_batch_size)

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def global_positions(self, step: int) -> np.ndarray:
        """Sample positions of the whole global batch at this step."""
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = epoch_permutation(self.seed, epoch, self.num_samples)
        return perm[k * self.global_batch_size:(k + 1) * self.global_batch_size]

    def rank_positions(self, step: int) -> np.ndarray:
        """Sample positions this rank reads at this step."""
        b = self.per_rank_batch_size
        return self.global_positions(step)[self.rank * b:(self.rank + 1) * b]
