"""Noise schedules (float64 numpy, as in DDPM / improved-DDPM)."""

from __future__ import annotations

import math

import numpy as np

from dtr_scale.config import ddim_timesteps  # noqa: F401  (config checks the spacing when it is set)


def linear_betas(num_timesteps: int) -> np.ndarray:
    # DDPM's 1e-4 .. 0.02 over 1000 steps, rescaled for other T (improved-DDPM).
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    # "squaredcos_cap_v2": alpha_bar(t) = cos^2(((t + 0.008) / 1.008) * pi / 2) (improved-DDPM, eq. 17)
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    t = np.arange(num_timesteps)
    ratios = np.array([alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps) for i in t])
    return np.minimum(1 - ratios, max_beta)


def make_betas(schedule: str, num_timesteps: int) -> np.ndarray:
    if schedule == "linear":
        return linear_betas(num_timesteps)
    if schedule == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown noise schedule {schedule!r}; expected 'linear' or 'cosine'")


def snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    # SNR_t = abar_t / (1 - abar_t)
    return alphas_cumprod / (1.0 - alphas_cumprod)


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps of the original grid, evenly strided and including 0 and T-1
    where the stride allows (improved-DDPM's respacing with a single section)."""
    if steps == num_timesteps:
        return list(range(num_timesteps))
    if steps == 1:
        return [0]
    stride = (num_timesteps - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]
