"""An in-memory toy latent dataset with a known answer.

Class c's latents are a fixed random pattern mu_c plus isotropic noise, so a
trained model's class-conditional samples should land near mu_c: the tests
and the quick main job measure exactly that distance.
"""

from __future__ import annotations

import torch

from dtr_scale.data.order import BatchOrder


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
    """Per-rank batches of the in-memory latents, in the order every loader uses (`BatchOrder`):
    global step s reads a slice of the epoch's permutation drawn from (seed, epoch), and rank r
    its contiguous part. The step is the whole state, saved as the stream position
    step x global batch, so resuming (also on another world size with the same global batch)
    continues the same sequence.
    """

    def __init__(self, dataset: SyntheticLatents, *, global_batch_size: int, rank: int, world_size: int, seed: int):
        self.dataset = dataset
        self.order = BatchOrder(len(dataset), global_batch_size, rank, world_size, seed)
        self.step = 0

    def __iter__(self) -> SyntheticLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor(self.order.rank_positions(self.step))
        self.step += 1
        return self.dataset.latents[idx], self.dataset.labels[idx]

    def state_dict(self) -> dict:
        return {"position": self.step * self.order.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        steps, rest = divmod(int(state["position"]), self.order.global_batch_size)
        if rest:
            raise ValueError(f"loader state position {state['position']} is not a whole number of global batches of "
                             f"{self.order.global_batch_size}; resume with the global_batch_size that wrote it")
        self.step = steps
