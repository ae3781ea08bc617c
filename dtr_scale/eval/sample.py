"""Load a trained model from a checkpoint and draw class-conditional latents."""

from __future__ import annotations

from pathlib import Path

import torch

from dtr_scale.config import TrainConfig
from dtr_scale.diffusion.sampling import sample_latents
from dtr_scale.models import DiT
from dtr_scale.train.checkpoint import load_checkpoint
from dtr_scale.train.components import build_diffusion, build_model, config_from_dict


def load_model(path: str | Path, *, use_ema: bool = True) -> tuple[DiT, TrainConfig]:
    """The (EMA by default) model of a checkpoint, in eval mode, and the run's config."""
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    model = build_model(cfg)
    model.load_state_dict(state["ema" if use_ema else "model"])
    return model.eval(), cfg


def sample_from_checkpoint(path: str | Path, labels: torch.Tensor, *, cfg_scale: float | None = None,
                           sampling_steps: int | None = None, sampler: str | None = None, seed: int = 0,
                           use_ema: bool = True, progress: bool = False) -> torch.Tensor:
    """Latents [N, C, H, W] for `labels`; unset options come from the run's diffusion config."""
    model, cfg = load_model(path, use_ema=use_ema)
    d = cfg.diffusion
    diffusion = build_diffusion(cfg).respaced(sampling_steps or d.sampling_steps)
    m = cfg.model
    return sample_latents(
        model, diffusion, labels, shape=(m.in_channels, m.input_size, m.input_size),
        cfg_scale=d.cfg_scale if cfg_scale is None else cfg_scale, guided_channels=d.guided_channels,
        sampler=sampler or d.sampler, eta=d.ddim_eta, generator=torch.Generator().manual_seed(seed),
        progress=progress,
    )
