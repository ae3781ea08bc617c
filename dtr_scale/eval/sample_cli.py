"""`dtr-scale sample`: images from any DiT weights, through the evaluator's generation path
(per-index seeds, chunks resumed after an interruption, any number of processes), as a PNG
grid, an ADM `.npz` and DiT's sample_ddp.py layout.

    dtr-scale sample --weights DiT-XL-2-256x256.pt --autoencoder sd-vae-ft-ema model=dit_xl2 \
        classes=[207,360,387,974] num_samples=8 diffusion.cfg_scale=4.0 diffusion.sampling_steps=250 out=samples/xl2
    dtr-scale sample --weights runs/my_run classes=balanced num_samples=40       # a run: its latest EMA
    dtr-scale sample --weights tiny.pt --autoencoder pixel model=tiny classes=random diffusion.sampler=ddim
    dtr-scale sample --weights runs/my_run classes=random num_samples=50000 world_size=8 device=cuda

The weights and their autoencoder are flags, as in `dtr-scale eval --weights`; the sampler is
the training config's own keys, as everywhere else (diffusion.sampler, diffusion.sampling_steps,
diffusion.cfg_scale, diffusion.guided_channels: `steps=` means training steps in this project).
    --weights     a .pt / .safetensors file (official DiT names), a checkpoint dir or a run dir  (required)
    --autoencoder pixel, sd-vae-ft-ema, ... (default: the one the config's shards were encoded with)

Own keys (the rest are the training config's overrides, group=option or key=value, which
name the model a weights file holds; a checkpoint brings its own config):
    classes       a list [1,2,...] (cycled over the samples), balanced (i % classes) or random  [balanced]
                  (random: one seeded draw for all samples, as the evaluator and DiT's sample_ddp)
    num_samples   how many images                                                             [16]
    seed          sample i draws its noise from (seed, i), as the evaluator does              [0]
    out           output folder                                                               [samples]
    device        cpu | cuda (process r of world_size uses GPU r)                             [cpu]
    world_size    sampling processes started here; under torchrun / srun (RANK, WORLD_SIZE set)
                  each launched process is one of them                                        [1]
    batch_size    samples per chunk (a chunk is sampled, decoded and written as one file)     [64]

What lands in OUT: samples.npz (ADM: arr_0 uint8 [N, H, W, 3], arr_1 labels), grid.png, and
samples/000000.png ... (DiT's sample_ddp.py: the PNG folder, with samples.npz its .npz). Run
the same command again after an interruption: the chunks on disk are kept, the rest sampled.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from dtr_scale.config import ConfigError, TrainConfig, to_train_config
from dtr_scale.eval.generate import SAMPLES_NPZ, distributed_position, generate_samples, load_samples
from dtr_scale.eval.released import model_from_weights, weights_decoder
from dtr_scale.eval.settings import SampleSpec
from dtr_scale.train.components import build_diffusion

log = logging.getLogger("dtr_scale")
SAMPLE_KEYS = {"classes": "balanced", "num_samples": 16, "seed": 0, "out": "samples", "device": "cpu", "batch_size": 64,
               "world_size": 1}
FLAGS = ("--weights", "--autoencoder")
# Spellings this command once took, and the one spelling each has now (the same as train's and eval's).
RENAMED = {"weights": "--weights PATH", "autoencoder": "--autoencoder NAME", "steps": "diffusion.sampling_steps=N",
           "sampler": "diffusion.sampler=ddpm|ddim", "cfg_scale": "diffusion.cfg_scale=S"}
PNG_FOLDER = "samples"  # DiT's sample_ddp.py: FOLDER/000000.png ... beside FOLDER.npz


def split_arguments(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """(the command's flags and own key=value settings with defaults, the config overrides)."""
    flags, words = {flag[2:]: None for flag in FLAGS}, []
    it = iter(args)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in FLAGS:
            flags[name[2:]] = value if eq else next(it, None)
            if not flags[name[2:]]:
                raise ConfigError(f"{name}: give it a value, e.g. {name} {RENAMED[name[2:]].split()[1]}")
        elif name.lstrip("+~") in RENAMED:
            raise ConfigError(f"{arg}: sample takes {RENAMED[name.lstrip('+~')]} "
                              f"(one spelling for train, eval and sample)")
        else:
            words.append(arg)
    own = [arg for arg in words if arg.split("=", 1)[0] in SAMPLE_KEYS]
    rest = [arg for arg in words if arg not in own]
    options = {**SAMPLE_KEYS, **flags, **OmegaConf.to_container(OmegaConf.from_dotlist(own))}
    if not options["weights"]:
        raise ConfigError("--weights: name the weights to sample from, e.g. --weights DiT-XL-2-256x256.pt model=dit_xl2")
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


def labels_of(classes: Any, num_classes: int) -> tuple[str, tuple[int, ...]]:
    """SampleSpec's (labels, classes) for the command's `classes` setting."""
    if classes in ("balanced", "random"):
        return classes, ()
    chosen = [int(c) for c in (classes if isinstance(classes, list) else [classes])]
    if not chosen or min(chosen) < 0 or max(chosen) >= num_classes:
        raise ConfigError(f"classes={classes}: give class indices in [0, {num_classes}), balanced or random")
    return "classes", tuple(chosen)


def sample_spec(options: dict[str, Any], model_cfg: TrainConfig, cfg: TrainConfig) -> SampleSpec:
    """What to draw: the model's classes and latent shape, the command's counts and cfg's sampler."""
    m, d = model_cfg.model, cfg.diffusion
    labels, classes = labels_of(options["classes"], m.num_classes)
    return SampleSpec(weights=str(options["weights"]), num_samples=int(options["num_samples"]),
                      chunk_size=int(options["batch_size"]), num_classes=m.num_classes,
                      latent_shape=(m.in_channels, m.input_size, m.input_size), labels=labels, classes=classes,
                      seed=int(options["seed"]), sampler=d.sampler, sampling_steps=d.sampling_steps,
                      cfg_scale=d.cfg_scale, guided_channels=d.guided_channels, ddim_eta=d.ddim_eta)


def rank_device(device: str, rank: int) -> torch.device:
    """Process `rank`'s device: GPU rank (modulo the GPUs here) for device=cuda."""
    if device != "cuda":
        return torch.device(device)
    if not torch.cuda.is_available():
        raise ConfigError("device=cuda, but no GPU is visible here; sample with device=cpu or where the GPUs are")
    return torch.device("cuda", rank % torch.cuda.device_count())


@torch.no_grad()
def sample_rank(rank: int, world_size: int, options: dict[str, Any], overrides: list[str]) -> Path | None:
    """This process's share of the chunks (rank, rank + world_size, ...) into OUT; rank 0 then
    waits for the others' and merges them (OUT/samples.npz, OUT/grid.png), whose path it returns."""
    cfg = compose_config(overrides, str(options["out"]))
    model, model_cfg = model_from_weights(options["weights"], cfg)
    device = rank_device(str(options["device"]), rank)
    d = cfg.diffusion
    diffusion = build_diffusion(model_cfg).respaced(d.sampling_steps, d.sampler)
    return generate_samples(model, diffusion, sample_spec(options, model_cfg, cfg), options["out"],
                            weights_decoder(model_cfg, device, options["autoencoder"]), rank=rank,
                            world_size=world_size, device=device, progress=rank == 0)


def _spawned(rank: int, world_size: int, options: dict[str, Any], overrides: list[str]) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))  # processes share the CPU
    sample_rank(rank, world_size, options, overrides)


def write_png_folder(npz: str | Path, folder: str | Path) -> Path:
    """DiT's sample_ddp.py layout: FOLDER/{i:06d}.png for sample i of the ADM npz; images already
    there are kept (a rerun after an interruption writes the rest)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images, _ = load_samples(npz)
    for i, image in enumerate(images):
        path = folder / f"{i:06d}.png"
        if not path.exists():
            partial = path.with_name(f".{path.name}.partial")
            Image.fromarray(image).save(partial, format="PNG")
            partial.replace(path)  # a reader never sees half an image under the real name
    return folder


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(f"usage: dtr-scale sample --weights PATH [--autoencoder NAME] [own keys] [key=value ...] [group=option ...]\n\n{__doc__}")
        return
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        options, overrides = split_arguments(args)
        world_size = int(options["world_size"])
        if world_size < 1:
            raise ConfigError(f"world_size={world_size}: sample with 1 or more processes")
        launched = "WORLD_SIZE" in os.environ  # torchrun / srun started every process: this is one of them
        if launched:
            npz = sample_rank(*distributed_position(), options, overrides)
        elif world_size == 1:
            npz = sample_rank(0, 1, options, overrides)
        else:  # a bad override or device fails here, not in every process
            compose_config(overrides, str(options["out"]))
            rank_device(str(options["device"]), 0)
            torch.multiprocessing.start_processes(_spawned, args=(world_size, options, overrides),
                                                  nprocs=world_size, start_method="spawn")
            npz = Path(options["out"]) / SAMPLES_NPZ
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"dtr-scale sample: {err}", file=sys.stderr)
        sys.exit(2)
    except torch.multiprocessing.ProcessRaisedException as err:
        print(f"dtr-scale sample: a sampling process failed (the chunks written are kept; run the same command "
              f"again to finish):\n{err}", file=sys.stderr)
        sys.exit(1)
    if npz is None:  # a launched rank other than 0: rank 0 merges and reports
        return
    folder = write_png_folder(npz, Path(options["out"]) / PNG_FOLDER)
    print(f"{len(load_samples(npz)[1])} samples: {npz}, {npz.with_name('grid.png')} and {folder}/")


if __name__ == "__main__":
    main()
