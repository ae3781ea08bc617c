"""The training objective: diffusion loss terms plus the chosen timestep weighting.

One module so that its learnable state (ANT-UW's log-variances) travels with
the optimizer and the checkpoint like any other parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dtr_scale.config import WeightingConfig
from dtr_scale.diffusion.gaussian import GaussianDiffusion
from dtr_scale.diffusion.mtl import NashState, nash_weighted_loss
from dtr_scale.diffusion.schedules import snr as snr_of
from dtr_scale.diffusion.weighting import (
    UncertaintyWeighting,
    interval_boundaries,
    interval_index,
    interval_means,
    min_snr_weight,
    p2_weight,
    stratified_timesteps,
)


@dataclass
class StepLoss:
    loss: torch.Tensor  # scalar to backpropagate
    mse: torch.Tensor  # [N] per-sample, unweighted
    vb: torch.Tensor  # [N] per-sample
    interval_losses: torch.Tensor  # [k] mean unweighted MSE + VB per interval (NaN where empty)
    interval_counts: torch.Tensor  # [k]


class TrainingObjective(nn.Module):
    def __init__(self, diffusion: GaussianDiffusion, cfg: WeightingConfig):
        super().__init__()
        self.diffusion = diffusion
        self.cfg = cfg
        snr = snr_of(diffusion.alphas_cumprod)
        bounds = interval_boundaries(cfg.intervals, snr, cfg.num_intervals)
        self.register_buffer("boundaries", torch.from_numpy(bounds), persistent=False)
        self.register_buffer("snr", torch.from_numpy(snr).float(), persistent=False)
        self.uw = UncertaintyWeighting(cfg.num_intervals) if cfg.kind == "ant_uw" else None
        self.nash = NashState(cfg.num_intervals) if cfg.kind == "ant_nash" else None

    @property
    def num_intervals(self) -> int:
        return len(self.boundaries) - 1

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Timesteps on the generator's device (the CPU without one)."""
        device = generator.device if generator is not None else torch.device("cpu")
        if self.cfg.stratify:
            return stratified_timesteps(batch_size, self.boundaries.to(device), generator)
        return torch.randint(0, self.diffusion.num_timesteps, (batch_size,), generator=generator, device=device)

    def sample_weights(self, t: torch.Tensor) -> torch.Tensor:
        snr = self.snr[t]
        if self.cfg.kind == "min_snr":
            # the form for the target the MSE is taken on, so weight and target cannot disagree
            return min_snr_weight(snr, self.cfg.min_snr_gamma, self.diffusion.prediction)
        if self.cfg.kind == "p2":
            return p2_weight(snr, self.cfg.p2_gamma, self.cfg.p2_k)
        return torch.ones_like(snr)

    def forward(self, model: nn.Module, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> StepLoss:
        x_t = self.diffusion.q_sample(x0, t, noise)
        out = model(x_t, t, y, force_drop_ids=force_drop_ids)
        terms = self.diffusion.training_losses(out.float(), x0, x_t, t, noise)
        interval = interval_index(t, self.boundaries)
        k = self.num_intervals
        # differentiable: ANT-UW weighs, ANT-Nash and PCGrad differentiate, each interval's whole
        # loss MSE + VB (the trainer detaches for logs)
        per_interval, counts = interval_means(terms.mse + terms.vb, interval, k)
        if self.uw is not None:
            return StepLoss(self.uw(per_interval), terms.mse, terms.vb, per_interval, counts)
        if self.nash is not None:
            return StepLoss(nash_weighted_loss(per_interval, self.nash.alpha), terms.mse, terms.vb, per_interval, counts)
        # per-sample weights multiply the MSE only; the VB term stays unweighted
        weighted_mse = (self.sample_weights(t) * terms.mse).mean()
        return StepLoss(weighted_mse + terms.vb.mean(), terms.mse, terms.vb, per_interval, counts)
