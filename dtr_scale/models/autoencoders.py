"""The autoencoders that map images to latents and back: the SD VAE, and a weight-free `pixel` one.

Common interface (what prep, the trainer and the evaluator use):
    id, scale_factor, latent_channels, downsample, latent_shape(resolution)
    encode(images uint8 [N, H, W, 3]) -> (mean, std) float32 [N, C, h, w], UNSCALED posterior
    decode(latents float32 [N, C, h, w], model space, i.e. times scale_factor) -> uint8 [N, H, W, 3]
diffusers is imported only when an SD VAE is loaded, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import os
from typing import Protocol

import torch
import torch.nn.functional as F

from dtr_scale.extras import import_extra

SD_VAES = {"sd-vae-ft-ema": "stabilityai/sd-vae-ft-ema", "sd-vae-ft-mse": "stabilityai/sd-vae-ft-mse"}
AUTOCAST_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MissingWeightsError(FileNotFoundError):
    """Autoencoder weights that are not on this machine; the message says what to download and where."""


class Autoencoder(Protocol):
    id: str
    scale_factor: float
    latent_channels: int
    downsample: int

    def latent_shape(self, resolution: int) -> tuple[int, int, int]: ...
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...


def images_to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float32 [N, C, H, W] in [-1, 1] (DiT's Normalize(0.5, 0.5))."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def unit_range_to_images(x: torch.Tensor) -> torch.Tensor:
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class PixelAutoencoder:
    """Grayscale pixels as a 4-channel "latent": [-1, 1], space-to-depth(2), so the model sees 4 x H/2 x W/2.

    Deterministic (std = 0) and weight-free: the embedded digits train through the same code as SD latents.
    """

    id = "pixel"
    scale_factor = 1.0
    latent_channels = 4
    downsample = 2

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.downsample:
            raise ValueError(f"the pixel autoencoder needs an even resolution, got {resolution}")
        return (self.latent_channels, resolution // self.downsample, resolution // self.downsample)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gray = images_to_unit_range(images).mean(dim=1, keepdim=True)
        mean = F.pixel_unshuffle(gray, self.downsample)
        return mean, torch.zeros_like(mean)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        gray = F.pixel_shuffle(latents.float() / self.scale_factor, self.downsample)
        return unit_range_to_images(gray.repeat(1, 3, 1, 1))


class SDVAE:
    """A diffusers AutoencoderKL; the posterior's mean and std are what prep stores."""

    def __init__(self, vae, ae_id: str, device: str = "cpu", autocast: str = "none") -> None:
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast={autocast!r} is not one of {', '.join(AUTOCAST_DTYPES)}")
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.id = ae_id
        self.device = torch.device(device)
        self.autocast = autocast
        self.scale_factor = float(vae.config.scaling_factor)
        self.latent_channels = int(vae.config.latent_channels)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        if resolution % self.downsample:
            raise ValueError(f"resolution {resolution} is not divisible by the VAE's downsampling {self.downsample}")
        return (self.latent_channels, resolution // self.downsample, resolution // self.downsample)

    def _autocast(self):
        dtype = AUTOCAST_DTYPES[self.autocast]
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            posterior = self.vae.encode(images_to_unit_range(images.to(self.device))).latent_dist
        return posterior.mean.float().cpu(), posterior.std.float().cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            x = self.vae.decode(latents.to(self.device) / self.scale_factor).sample
        return unit_range_to_images(x.cpu())


def _missing_weights_message(name: str, repo: str | None, weights: str | None) -> str:
    where = f"at {weights}" if weights else "in the Hugging Face cache (HF_HOME, default ~/.cache/huggingface)"
    if repo is None:
        return (f"no AutoencoderKL weights {where}: the directory needs config.json and "
                "diffusion_pytorch_model.safetensors (as written by AutoencoderKL.save_pretrained)")
    return (f"SD VAE weights for {name} not found {where}. On a machine with internet, download config.json "
            f"and diffusion_pytorch_model.safetensors from https://huggingface.co/{repo}, e.g. "
            f"`huggingface-cli download {repo} --local-dir vae/{name}`, copy the directory here and pass "
            f"--vae-weights vae/{name} (or fill the Hugging Face cache with `huggingface-cli download {repo}`)")


def load_autoencoder(name: str, *, weights: str | None = None, device: str = "cpu",
                     autocast: str = "none") -> Autoencoder:
    """`pixel`, `sd-vae-ft-ema`/`sd-vae-ft-mse` (or their Hugging Face ids), or a save_pretrained directory.

    `weights` is a local directory holding the named VAE; without it the Hugging Face cache is used.
    Nothing is downloaded.
    """
    if name == "pixel":
        return PixelAutoencoder()
    repo = SD_VAES.get(name) or (name if name in SD_VAES.values() else None)
    if repo is None and not os.path.isdir(name):
        raise ValueError(f"unknown autoencoder {name!r}: use pixel, {', '.join(SD_VAES)} or a directory "
                         "written by AutoencoderKL.save_pretrained")
    location = weights or repo or name
    if weights is not None and not os.path.isdir(weights):
        raise MissingWeightsError(_missing_weights_message(name, repo, weights))
    AutoencoderKL = import_extra("diffusers").AutoencoderKL  # heavy import, only when a VAE is really used

    try:
        vae = AutoencoderKL.from_pretrained(location, local_files_only=True)
    except (OSError, ValueError) as err:
        raise MissingWeightsError(_missing_weights_message(name, repo, weights) + f" ({str(err).splitlines()[0]})") from err
    ae_id = repo or os.path.abspath(name)
    return SDVAE(vae, ae_id, device=device, autocast=autocast)
