"""A fresh training latent from a stored posterior: z = scale * (mean + std * eps), on the image or its flip.

As EDM2 does, the dataset stores the VAE posterior (mean, std) rather than one sample of it, so every epoch
sees a new draw. The draw (eps and the flip) depends only on (seed, epoch, sample position): the same
values come back after a resume and whatever rank or worker reads the sample.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch


def draw_key(seed: int, epoch: int, position: int) -> tuple[int, bool]:
    """(noise seed, flip) of one sample in one epoch; blake2b so neighbouring inputs give unrelated draws.

    torch's CPU generator keeps only 32 bits of its seed, so two (epoch, sample) draws share the same eps
    with probability 2**-32 per pair; harmless for training, and torch.randn is ~3x faster than numpy's.
    """
    digest = hashlib.blake2b(struct.pack("<qqq", seed, epoch, position), digest_size=9).digest()
    return int.from_bytes(digest[:8], "little"), bool(digest[8] & 1)


def draw_noise_and_flips(seed: int, epoch: int, positions: np.ndarray,
                         shape: tuple[int, ...]) -> tuple[torch.Tensor, np.ndarray]:
    """(eps float32 [B, *shape], flips bool [B]) for the samples at these positions."""
    eps = torch.empty((len(positions), *shape))
    flips = np.empty(len(positions), dtype=bool)
    generator = torch.Generator()
    for j, position in enumerate(positions.tolist()):
        noise_seed, flips[j] = draw_key(seed, epoch, position)
        torch.randn(shape, generator=generator.manual_seed(noise_seed), out=eps[j])
    return eps, flips


def sample_latents(views: np.ndarray, eps: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Model-ready latents float32 [B, C, h, w] from the stored moments of each sample's chosen view (image or
    flip) [B, 2C, h, w] (posterior mean | std)."""
    mean, std = torch.from_numpy(views).float().chunk(2, dim=1)
    return torch.addcmul(mean, std, eps).mul_(scale_factor)
