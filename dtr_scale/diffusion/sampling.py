"""Ancestral DDPM and DDIM sampling loops, with classifier-free guidance."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from dtr_scale.diffusion.gaussian import GaussianDiffusion, ModelFn


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
    progress: bool = False,
) -> torch.Tensor:
    """Draw latents [N, *shape] for `labels` by running `diffusion` (usually respaced) backwards."""
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    model_fn, copies = guided_model_fn(model, labels, cfg_scale, guided_channels)
    device = labels.device
    n = len(labels)

    def gaussian() -> torch.Tensor:
        z = torch.randn((n, *shape), generator=generator, device="cpu").to(device)
        return torch.cat([z] * copies)

    x = gaussian()
    steps = range(diffusion.num_timesteps - 1, -1, -1)
    for i in tqdm(steps, desc=f"{sampler} sampling", disable=None if progress else True, leave=False):
        t = torch.full((len(x),), i, device=device, dtype=torch.long)
        noise = gaussian()
        if sampler == "ddpm":
            x = diffusion.p_sample(model_fn, x, t, noise)
        else:
            x = diffusion.ddim_sample(model_fn, x, t, noise, eta)
    return x[:n]
