"""An in-memory toy latent dataset with a known answer.

Class c's latents are a fixed random pattern mu_c plus isotropic noise, so a
trained model's class-conditional samples should land near mu_c: the tests
and the quick main job measure exactly that distance.
"""

from __future__ import annotations

import numpy as np
import torch


def step_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (seed, step, ...), stable across runs and platforms."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class SyntheticLatents:
    """`num_samples` latents [C, H, W] in `num_classes` Gaussian blobs, built from `seed`."""

    def __init__(self, num_samples: int, num_classes: int, shape: tuple[int, int, int],
                 noise_std: float = 0.3, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.class_means = torch.randn(num_classes, *shape, generator=generator).clamp(-2, 2)
        self.labels = torch.arange(num_samples) % num_classes
        noise = torch.randn(num_samples, *shape, generator=generator)
        self.latents = self.class_means[self.labels] + noise_std * noise
        self.noise_std = noise_std
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)


class SyntheticLoader:
    """Per-rank batches from a deterministic stream of epoch permutations.

    The global batch of step s is stream positions [s*B, (s+1)*B); rank r takes
    its contiguous slice. The position is the whole state, so resuming (also on
    another world size with the same global batch) continues the same stream.
    """

    def __init__(self, dataset: SyntheticLatents, *, global_batch_size: int, rank: int, world_size: int, seed: int):
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.position = 0

    def _indices(self, start: int, count: int) -> torch.Tensor:
        n = len(self.dataset)
        positions = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.long)
        for epoch in positions.div(n, rounding_mode="floor").unique().tolist():
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(self.seed, epoch)))
            here = positions.div(n, rounding_mode="floor") == epoch
            out[here] = perm[positions[here] % n]
        return out

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        per_rank = self.global_batch_size // self.world_size
        idx = self._indices(self.position + self.rank * per_rank, per_rank)
        self.position += self.global_batch_size
        return self.dataset.latents[idx], self.dataset.labels[idx]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
