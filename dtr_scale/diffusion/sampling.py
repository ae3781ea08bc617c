"""Ancestral DDPM and DDIM sampling loops, with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from dtr_scale.diffusion.gaussian import GaussianDiffusion, ModelFn

Noise = Callable[[tuple[int, ...]], torch.Tensor]  # shape [N, ...] -> standard normal draws of that shape


def guided_model_fn(model: torch.nn.Module, labels: torch.Tensor, cfg_scale: float,
                    guided_channels: str = "all") -> tuple[ModelFn, int]:
    """A (x, t) -> output function for `labels`, and the batch multiplier it needs.

    With cfg_scale > 1 the batch is doubled: the second half carries the null
    class, both halves the same t (so the same DTR masks).
    """
    if cfg_scale == 1.0:
        return (lambda x, t: model(x, t, labels)), 1
    null = torch.full_like(labels, model.num_classes)
    y = torch.cat([labels, null])
    k = None if guided_channels == "all" else 3
    return (lambda x, t: model.forward_with_cfg(x, t, y, cfg_scale, guided_channels=k)), 2


def generator_noise(generator: torch.Generator | None) -> Noise:
    """Draws from `generator` on the CPU, so a seed gives the same samples on any device."""
    return lambda size: torch.randn(size, generator=generator, device="cpu")


@torch.no_grad()
def sample_latents(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    labels: torch.Tensor,
    *,
    shape: tuple[int, int, int],
    cfg_scale: float = 1.5,
    guided_channels: str = "all",
    sampler: str = "ddpm",
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    noise: Noise | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw latents [N, *shape] for `labels` by running `diffusion` (usually respaced) backwards.

    `noise` draws the initial latents and every step's noise; by default `generator` does.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    if noise is not None and generator is not None:
        raise ValueError("pass either a generator or a noise source, not both")
    noise = generator_noise(generator) if noise is None else noise
    model_fn, copies = guided_model_fn(model, labels, cfg_scale, guided_channels)
    device = labels.device
    n = len(labels)

    def gaussian() -> torch.Tensor:
        z = noise((n, *shape)).to(device)
        return torch.cat([z] * copies)  # both CFG halves share the noise

    x = gaussian()
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    for i in tqdm(steps, desc=f"{sampler} sampling", disable=None if progress else True, leave=False):
        t = torch.full((len(x),), i, device=device, dtype=torch.long)
        z = gaussian()
        if sampler == "ddpm":
            x = diffusion.p_sample(model_fn, x, t, z)
        else:
            x = diffusion.ddim_sample(model_fn, x, t, z, eta)
    return x[:n]
