"""A checkpoint's model, and class-conditional latents drawn from it."""

from __future__ import annotations

from pathlib import Path

import torch

from dtr_scale.config import TrainConfig
from dtr_scale.diffusion.sampling import sample_latents
from dtr_scale.io import atomic_write
from dtr_scale.models import DiT
from dtr_scale.train.backends import read_weights
from dtr_scale.train.checkpoint import open_checkpoint
from dtr_scale.train.components import build_diffusion, build_model


def load_model(path: str | Path, *, use_ema: bool = True) -> tuple[DiT, TrainConfig]:
    """The (EMA by default) model of a checkpoint directory, in eval mode, and the run's config.
    The checkpoint's files are checked against the run's manifest first."""
    checkpoint = open_checkpoint(path)
    model = build_model(checkpoint.config, load_init=False)
    model.load_state_dict(read_weights(checkpoint.path, "ema" if use_ema else "raw"))
    return model.eval(), checkpoint.config


def routing_export(model: DiT, cfg: TrainConfig) -> dict:
    """What a routed model needs beyond DiT's own weights: its kind, settings and mask tables
    ([1 or depth, T, C] bool). A vanilla DiT has none of it and ignores it."""
    r = cfg.routing
    if model.routing is None:
        return {"kind": "none"}
    return {"kind": r.kind, "beta": float(r.beta), "alpha": float(r.alpha), "seed": int(r.seed),
            "tables": model.routing.tables.cpu().clone()}


def dit_checkpoint_path(out: str | Path) -> Path:
    """Where export_ema writes the .pt beside OUT.safetensors."""
    return Path(out).with_suffix(".pt")


def export_ema(checkpoint: str | Path, out: str | Path) -> Path:
    """The EMA weights with the official DiT names, twice: OUT (safetensors, loadable by a vanilla
    `create_model(...)` with strict=True; returned) and dit_checkpoint_path(OUT), a dict that DiT's
    own `find_model` loads (torch.load, then its "ema" entry; weights only) and whose "routing"
    entry holds a DTR or R-TR model's mask tables (DiT's code ignores it: such weights are only
    the trained model inside a routed DiT)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: name the export NAME.safetensors (NAME.pt is written beside it)")
    model, cfg = load_model(checkpoint, use_ema=True)
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(out), metadata={"model": cfg.model.name, "routing": cfg.routing.kind,
                                           "beta": str(cfg.routing.beta), "alpha": str(cfg.routing.alpha),
                                           "routing_seed": str(cfg.routing.seed), "source": str(checkpoint)})
    atomic_write(dit_checkpoint_path(out), lambda f: torch.save(
        {"ema": weights, "routing": routing_export(model, cfg), "model": cfg.model.name, "source": str(checkpoint)}, f))
    return out


def sample_from_checkpoint(path: str | Path, labels: torch.Tensor, *, cfg_scale: float | None = None,
                           sampling_steps: int | None = None, sampler: str | None = None, seed: int = 0,
                           use_ema: bool = True, progress: bool = False) -> torch.Tensor:
    """Latents [N, C, H, W] for `labels`; unset options come from the run's diffusion config."""
    model, cfg = load_model(path, use_ema=use_ema)
    d = cfg.diffusion
    diffusion = build_diffusion(cfg).respaced(sampling_steps or d.sampling_steps, sampler or d.sampler)
    m = cfg.model
    return sample_latents(
        model, diffusion, labels, shape=(m.in_channels, m.input_size, m.input_size),
        cfg_scale=d.cfg_scale if cfg_scale is None else cfg_scale, guided_channels=d.guided_channels,
        sampler=sampler or d.sampler, eta=d.ddim_eta, generator=torch.Generator().manual_seed(seed),
        progress=progress,
    )
