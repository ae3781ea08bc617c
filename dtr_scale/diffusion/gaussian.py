"""Gaussian diffusion with learned (interpolated) variance, as in improved-DDPM and DiT.

The model predicts one target (`prediction`): epsilon (DiT, DTR), v = sqrt(abar) eps -
sqrt(1 - abar) x0 (Salimans & Ho 2022) or x0. The MSE is taken on that target; the VB
term and the samplers convert the prediction to x0 and epsilon.

`GaussianDiffusion` holds one schedule; a respaced sampler is the same class
built on a subset of the original timesteps (`respaced`), with `timestep_map`
translating its indices back to the original 0..T-1 that the model (and its
DTR masks) is conditioned on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from dtr_scale.diffusion.schedules import ddim_timesteps, make_betas, space_timesteps

PREDICTIONS = ("eps", "v", "x0")

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, original t) -> model output


_TABLES_ON_DEVICE: dict[tuple[int, torch.device], tuple[np.ndarray, torch.Tensor]] = {}


def _on_device(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    """A schedule table copied to `device` once: a copy from pageable host memory waits for the
    device, which a training step must not do."""
    key = (id(arr), device)
    cached = _TABLES_ON_DEVICE.get(key)
    if cached is None or cached[0] is not arr:  # an id can be reused once its array is gone
        cached = _TABLES_ON_DEVICE[key] = (arr, torch.from_numpy(arr).to(device))
    return cached[1]


def _extract(arr: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """arr[t] as float32 on t's device, broadcastable to an ndim-dim tensor."""
    out = _on_device(arr, t.device)[t].float()
    return out.view(-1, *([1] * (ndim - 1)))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    # KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    # log-likelihood of data in [-1, 1] discretized to 256 bins (DDPM's decoder L_0)
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs


@dataclass
class DiffusionLosses:
    mse: torch.Tensor  # [N] per-sample MSE on the prediction target
    vb: torch.Tensor  # [N] per-sample variational bound term (bits/dim); zeros without learned sigma


class GaussianDiffusion:
    def __init__(self, betas: np.ndarray, learn_sigma: bool = True, timestep_map: np.ndarray | None = None,
                 prediction: str = "eps"):
        if prediction not in PREDICTIONS:
            raise ValueError(f"diffusion.prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
        self.prediction = prediction
        self.betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(self.betas)
        self.learn_sigma = learn_sigma
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map)

        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the variance is 0 at t = 0; clip its log with the t = 1 value
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @classmethod
    def from_schedule(cls, schedule: str = "linear", num_timesteps: int = 1000, learn_sigma: bool = True,
                      prediction: str = "eps") -> "GaussianDiffusion":
        return cls(make_betas(schedule, num_timesteps), learn_sigma, prediction=prediction)

    def respaced(self, steps: int, sampler: str = "ddpm") -> "GaussianDiffusion":
        """A sampler over `steps` of this schedule's timesteps, with betas recomputed so that
        its alphas_cumprod are the originals at the kept steps (improved-DDPM Sec. 4).
        DDPM strides evenly through 0..T-1; DDIM uses DiT's "ddimN" spacing (stride T // N from 0)."""
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
        keep = (ddim_timesteps if sampler == "ddim" else space_timesteps)(self.num_timesteps, steps)
        abar = self.alphas_cumprod[keep]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return GaussianDiffusion(betas, self.learn_sigma, self.timestep_map[keep], self.prediction)

    # forward process ---------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        # x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
        return (_extract(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (_extract(self.posterior_mean_coef1, t, x_t.ndim) * x0
                + _extract(self.posterior_mean_coef2, t, x_t.ndim) * x_t)
        return mean, _extract(self.posterior_log_variance_clipped, t, x_t.ndim)

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the model is trained to output at x_t = q_sample(x0, t, noise)."""
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        # v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, eq. 7 ff.)
        return (_extract(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
                - _extract(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)

    # reverse process ---------------------------------------------------------

    def split_output(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, log variance) from the model output; learned sigma interpolates between
        the posterior variance and beta_t in log space (improved-DDPM eq. 15)."""
        if not self.learn_sigma:
            logvar = np.log(np.append(self.posterior_variance[1], self.betas[1:]))
            return out, _extract(logvar, t, x_t.ndim).expand_as(x_t)
        pred, v = out.chunk(2, dim=1)
        min_log = _extract(self.posterior_log_variance_clipped, t, x_t.ndim)
        max_log = _extract(np.log(self.betas), t, x_t.ndim)
        frac = (v + 1) / 2
        return pred, frac * max_log + (1 - frac) * min_log

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        # the same relation solved for eps
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim)

    def x0_from_prediction(self, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The x0 that the model's prediction of its target implies at x_t."""
        if self.prediction == "eps":
            return self.predict_x0(x_t, t, pred)
        if self.prediction == "x0":
            return pred
        # x0 = sqrt(abar) x_t - sqrt(1 - abar) v
        return (_extract(self.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
                - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * pred)

    def p_mean_variance(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pred, logvar = self.split_output(out, x_t, t)
        x0 = self.x0_from_prediction(x_t, t, pred)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x_t, t)
        return mean, logvar, x0

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original-grid timesteps the model is conditioned on."""
        return torch.from_numpy(self.timestep_map).to(t.device)[t]

    # training ----------------------------------------------------------------

    def vb_terms_bpd(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample L_t (KL to the true posterior) or L_0 (decoder NLL), in bits per dim."""
        true_mean, true_logvar = self.q_posterior(x0, x_t, t)
        mean, logvar, _ = self.p_mean_variance(out, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_logvar, mean, logvar)) / np.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar)) / np.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> DiffusionLosses:
        """DiT's loss terms for a model output `out` at x_t: MSE on the prediction target, plus
        the VB term that trains the variance on a stop-gradient of the mean."""
        target = self.training_target(x0, t, noise)
        if not self.learn_sigma:
            return DiffusionLosses(mse=mean_flat((target - out) ** 2), vb=torch.zeros(len(t), device=out.device))
        pred, v = out.chunk(2, dim=1)
        frozen = torch.cat([pred.detach(), v], dim=1)
        return DiffusionLosses(mse=mean_flat((target - pred) ** 2), vb=self.vb_terms_bpd(frozen, x0, x_t, t))

    # sampling ----------------------------------------------------------------

    def p_sample(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        mean, logvar, _ = self.p_mean_variance(model_fn(x, self.model_timesteps(t)), x, t)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return mean + nonzero * torch.exp(0.5 * logvar) * noise

    def ddim_sample(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                    eta: float = 0.0) -> torch.Tensor:
        # DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic
        out = model_fn(x, self.model_timesteps(t))
        pred, _ = self.split_output(out, x, t)
        x0 = self.x0_from_prediction(x, t, pred)
        eps = self.predict_eps(x, t, x0)  # from x0, as DiT does, whatever the target
        abar = _extract(self.alphas_cumprod, t, x.ndim)
        abar_prev = _extract(self.alphas_cumprod_prev, t, x.ndim)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = x0 * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
        return mean + nonzero * sigma * noise
