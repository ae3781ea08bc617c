"""Load a trained model from a checkpoint and draw class-conditional latents."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.distributed.checkpoint import CheckpointException

from dtr_scale.config import TrainConfig
from dtr_scale.diffusion.sampling import sample_latents
from dtr_scale.models import DiT
from dtr_scale.train.checkpoint import CheckpointError, dcp_load, read_meta, require_complete
from dtr_scale.train.components import build_diffusion, build_model, config_from_dict

EMA_EXPORT = "ema.safetensors"  # written beside a checkpoint by backends that cannot be read with DCP


def load_model(path: str | Path, *, use_ema: bool = True) -> tuple[DiT, TrainConfig]:
    """The (EMA by default) model of a checkpoint directory, in eval mode, and the run's config.

    Reads only the requested weights: the optimizer and the other copy stay on disk. The
    checkpoint's files are checked against the run's manifest first.
    """
    path = Path(path)
    require_complete(path)
    cfg = config_from_dict(read_meta(path)["config"])
    model = build_model(cfg, load_init=False)
    if use_ema and (path / EMA_EXPORT).exists():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(path / EMA_EXPORT)))
        return model.eval(), cfg
    weights = model.state_dict()
    request = {"ema": weights} if use_ema else {"module": {f"model.{k}": v for k, v in weights.items()}}
    try:
        with warnings.catch_warnings():  # DCP's note that it reads without a process group: intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load(request, path)
    except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
        raise CheckpointError(f"could not read the {'EMA' if use_ema else 'model'} weights of {path} "
                              f"({type(err).__name__}: {err})") from err
    if not use_ema:
        weights = {k[len("model."):]: v for k, v in request["module"].items()}
    model.load_state_dict(weights)
    return model.eval(), cfg


def export_ema(checkpoint: str | Path, out: str | Path) -> Path:
    """The EMA weights as one safetensors file with the official DiT names, loadable by a
    vanilla `create_model(...)` with strict=True and nothing of this project's machinery."""
    from safetensors.torch import save_file

    model, cfg = load_model(checkpoint, use_ema=True)
    out = Path(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out),
              metadata={"model": cfg.model.name, "routing": cfg.routing.kind, "beta": str(cfg.routing.beta),
                        "alpha": str(cfg.routing.alpha), "source": str(checkpoint)})
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
