"""`dtr-scale sample`: images from any DiT weights, as a PNG grid and an ADM `.npz`.

    dtr-scale sample weights=DiT-XL-2-256x256.pt model=dit_xl2 autoencoder=sd-vae-ft-ema \
        classes=[207,360,387,974] num_samples=8 cfg_scale=4.0 steps=250 out=samples/xl2
    dtr-scale sample weights=runs/my_run classes=balanced num_samples=40       # a run: its latest EMA
    dtr-scale sample weights=tiny.pt model=tiny autoencoder=pixel classes=random sampler=ddim steps=50

Own keys (the rest are the training config's overrides, group=option or key=value, which
name the model a weights file holds; a checkpoint brings its own config):
    weights       a .pt / .safetensors file (official DiT names), a checkpoint dir or a run dir  (required)
    classes       a list [1,2,...] (cycled over the samples), balanced (i % classes) or random  [balanced]
    num_samples   how many images                                                             [16]
    cfg_scale, sampler (ddpm|ddim), steps     default: the config's diffusion settings
    seed          sample i draws its noise from (seed, i), as the evaluator does              [0]
    autoencoder   pixel, sd-vae-ft-ema, ... (default: the one the config's shards were encoded with)
    out           output folder: grid.png (nearest-neighbour enlarged) and samples.npz (arr_0, arr_1) [samples]
    device        cpu | cuda                                                                  [cpu]
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from dtr_scale.config import ConfigError, TrainConfig, to_train_config
from dtr_scale.diffusion.sampling import sample_latents
from dtr_scale.eval.generate import GRID_PNG, SAMPLES_NPZ, indexed_noise, write_npz_atomic
from dtr_scale.eval.released import model_from_weights, weights_decoder
from dtr_scale.train.components import build_diffusion

log = logging.getLogger("dtr_scale")
SAMPLE_KEYS = {"weights": None, "classes": "balanced", "num_samples": 16, "cfg_scale": None, "sampler": None,
               "steps": None, "seed": 0, "autoencoder": None, "out": "samples", "device": "cpu", "batch_size": 64}
GRID_COLUMNS = 8


def split_arguments(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(the sample command's own key=value settings with defaults, the config overrides)."""
    own = [arg for arg in args if arg.split("=", 1)[0] in SAMPLE_KEYS]
    rest = [arg for arg in args if arg not in own]
    options = {**SAMPLE_KEYS, **OmegaConf.to_container(OmegaConf.from_dotlist(own))}
    if not options["weights"]:
        raise ConfigError("weights: name the weights to sample from, e.g. weights=DiT-XL-2-256x256.pt model=dit_xl2")
    return options, rest


def compose_config(overrides: list[str], out: str) -> TrainConfig:
    """The training config (dtr_scale/configs/train.yaml) with the overrides, as `dtr-scale train` composes it."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException

    try:
        with initialize_config_module(config_module="dtr_scale.configs", version_base="1.3"):
            raw = compose("train", overrides=[*overrides, f"run_dir={out}"])
    except HydraException as err:
        raise ConfigError(str(err)) from err
    return to_train_config(raw)


def sample_labels(classes: Any, num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """Labels of the samples: a list cycled, balanced i % K, or a seeded uniform draw."""
    if classes == "balanced":
        return np.arange(num_samples) % num_classes
    if classes == "random":
        return torch.randint(num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed)).numpy()
    chosen = np.asarray(classes if isinstance(classes, list) else [classes], dtype=np.int64)
    if chosen.size == 0 or chosen.min() < 0 or chosen.max() >= num_classes:
        raise ConfigError(f"classes={classes}: give class indices in [0, {num_classes}), balanced or random")
    return np.resize(chosen, num_samples)


def with_sampler(cfg: TrainConfig, options: dict[str, Any]) -> TrainConfig:
    """cfg with the sampler settings the command line names."""
    chosen = {"cfg_scale": options["cfg_scale"], "sampler": options["sampler"], "sampling_steps": options["steps"]}
    return dataclasses.replace(cfg, diffusion=dataclasses.replace(
        cfg.diffusion, **{k: v for k, v in chosen.items() if v is not None}))


@torch.no_grad()
def draw_samples(model: torch.nn.Module, model_cfg: TrainConfig, cfg: TrainConfig, labels: np.ndarray, *,
                 seed: int = 0, autoencoder: str | None = None, device: str = "cpu",
                 batch_size: int = 64) -> np.ndarray:
    """uint8 images [N, H, W, 3] for `labels` from `model` (built from model_cfg) with cfg's
    sampler; sample i's noise comes from (seed, i), as in the evaluator's samples."""
    d = cfg.diffusion
    diffusion = build_diffusion(model_cfg).respaced(d.sampling_steps, d.sampler)
    decode = weights_decoder(model_cfg, torch.device(device), autoencoder)
    m, model = model_cfg.model, model.to(device)
    batches = []
    for start in range(0, len(labels), batch_size):
        indices = np.arange(start, min(start + batch_size, len(labels)))
        latents = sample_latents(model, diffusion, torch.from_numpy(labels[indices]).to(device),
                                 shape=(m.in_channels, m.input_size, m.input_size), cfg_scale=d.cfg_scale,
                                 guided_channels=d.guided_channels, sampler=d.sampler, eta=d.ddim_eta,
                                 noise=indexed_noise(seed, indices))
        batches.append(decode(latents).cpu().numpy())
    return np.concatenate(batches)


def write_samples(out: str | Path, images: np.ndarray, labels: np.ndarray) -> tuple[Path, Path]:
    """OUT/grid.png (captioned by class, enlarged so small images are readable) and OUT/samples.npz."""
    from dtr_scale.eval.grids import labelled_grid, save_png

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid, _ = labelled_grid(images, labels, list(range(len(images))), min(GRID_COLUMNS, len(images)))
    write_npz_atomic(out / SAMPLES_NPZ, arr_0=images, arr_1=labels)
    return save_png(grid, out / GRID_PNG), out / SAMPLES_NPZ


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: dtr-scale sample weights=PATH [own keys] [key=value ...] [group=option ...]\n\n{__doc__}")
        return
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        options, overrides = split_arguments(args)
        cfg = with_sampler(compose_config(overrides, str(options["out"])), options)
        model, model_cfg = model_from_weights(options["weights"], cfg)
        labels = sample_labels(options["classes"], int(options["num_samples"]), model_cfg.model.num_classes,
                               int(options["seed"]))
        images = draw_samples(model, model_cfg, cfg, labels, seed=int(options["seed"]),
                              autoencoder=options["autoencoder"], device=str(options["device"]),
                              batch_size=int(options["batch_size"]))
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"dtr-scale sample: {err}", file=sys.stderr)
        sys.exit(2)
    grid, npz = write_samples(options["out"], images, labels)
    print(f"{len(images)} samples: {grid} and {npz}")


if __name__ == "__main__":
    main()
