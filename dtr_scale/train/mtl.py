"""ANT-Nash and PCGrad in the training step: the k per-interval gradients, combined.

A step that needs the per-interval gradients runs the wrapped module once per
interval, on that interval's rows of the rank's batch. L_i is a mean of
per-sample losses and the DiT has no layer that mixes samples, so this is exactly
the gradient of L_i, at the cost of one forward and backward over the batch (the
ANT code runs k backward passes through the whole batch's graph instead). Each
backward goes through the backend as any other, so DDP all-reduces it and FSDP2
reduce-scatters it: the gradients are averaged over ranks, and under FSDP2 each
rank holds only its shard. The k x k Gram matrix is the sum of the local shards'
dot products (one all-reduce of k^2 numbers under FSDP2; DDP's gradients are
already whole on every rank), so no full gradient is ever gathered. The combined
gradient sum_j w_j g_j replaces the step's gradient; the loop then clips and applies it.

Memory: the k gradients (the rank's shards under FSDP2) are held at once, in fp32.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist

from dtr_scale.config import TrainConfig
from dtr_scale.diffusion.mtl import (
    conflicting_pairs,
    nash_weights,
    normalize_gram,
    pcgrad_orders,
    pcgrad_weights,
)
from dtr_scale.diffusion.objective import TrainingObjective
from dtr_scale.diffusion.weighting import interval_index
from dtr_scale.rng import PCGRAD_ORDER_STREAM, step_seed
from dtr_scale.train.backends import Backend
from dtr_scale.train.metrics import StepTimer
from dtr_scale.world import World


def max_grad_norm(cfg: TrainConfig) -> float:
    """The loop's clipping norm: optimizer.grad_clip, and ANT-Nash's own max-norm 1 (ANT's trainer)."""
    norm = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip is not None else math.inf
    return min(norm, cfg.weighting.nash_max_grad_norm) if cfg.weighting.kind == "ant_nash" else norm


class IntervalGradientStep:
    """The step of `weighting=ant_nash` (on solve steps) and `weighting=pcgrad` (every step)."""

    def __init__(self, cfg: TrainConfig, objective: TrainingObjective, backend: Backend, world: World):
        self.cfg, self.kind = cfg, cfg.weighting.kind
        self.objective, self.backend, self.world = objective, backend, world
        self.conflicts: int | None = None  # PCGrad: conflicting pairs at the latest step

    def due(self, step: int) -> bool:
        """Whether `step` needs the k per-interval gradients (ANT-Nash solves every nash_update_every steps)."""
        return self.kind == "pcgrad" or step % self.cfg.weighting.nash_update_every == 0

    def run(self, x0: torch.Tensor, y: torch.Tensor, draws, step: int, timer: StepTimer) -> dict[str, torch.Tensor]:
        """k forward/backward passes, one per interval; leaves the combined gradient in the parameters'
        .grad and returns the step's detached outputs in the loop's form."""
        k = self.objective.num_intervals
        interval = interval_index(draws.t, self.objective.boundaries.to(draws.t.device))
        grads: torch.Tensor | None = None
        outs = []
        for i in range(k):
            rows = (interval == i).nonzero().squeeze(1)
            timer.start("forward_backward")
            with self.backend.micro_step(last=True):
                out = self.backend.forward(x0[rows], y[rows], draws.t[rows], draws.noise[rows], draws.drop[rows])
                self.backend.backward(out["interval_losses"][i])
            outs.append({name: value.detach() for name, value in out.items()})
            timer.start("mtl")
            local = self.backend.take_local_grads()
            if grads is None:
                sizes = [g.numel() for g in local]
                grads = torch.empty(k, sum(sizes), dtype=torch.float32, device=local[0].device)
            torch.cat([g.reshape(-1).float() for g in local], out=grads[i])
        gram = grads @ grads.T
        if self.world.size > 1 and self.backend.grads_sharded:
            dist.all_reduce(gram)  # shards partition each gradient: their dot products add up
        weights = self._weights(gram.double().cpu().numpy(), step)
        combined = torch.from_numpy(weights).to(grads) @ grads
        self.backend.set_local_grads(list(combined.split(sizes)))
        return self._outputs(outs, weights)

    def _weights(self, gram: np.ndarray, step: int) -> np.ndarray:
        """w with combined gradient sum_j w_j g_j, g_j the gradient of the un-divided L_j."""
        k = len(gram)
        if not np.isfinite(gram).all():
            # a NaN/Inf gradient: keep the method's state; the combined gradient is not finite
            # either, and the loop's health policy (stop or skip) deals with the step
            return (self.objective.nash.alpha.cpu().numpy() if self.kind == "ant_nash" else np.ones(k)) / k
        if self.kind == "ant_nash":
            state = self.objective.nash
            normalized, factor = normalize_gram(gram)
            alpha = nash_weights(normalized, factor, state.alpha.cpu().numpy(), self.cfg.weighting.nash_max_iter)
            state.alpha.copy_(torch.from_numpy(alpha))
            state.normalization.fill_(factor)
            state.solved_at.fill_(step)
            return alpha / k  # sum_i alpha_i L_i / k
        self.conflicts = conflicting_pairs(gram)
        generator = torch.Generator().manual_seed(step_seed(self.cfg.seed, step, PCGRAD_ORDER_STREAM))
        return pcgrad_weights(gram, pcgrad_orders(k, generator)) / k  # the ANT code's L_i / k

    def _outputs(self, outs: list[dict[str, torch.Tensor]], weights: np.ndarray) -> dict[str, torch.Tensor]:
        k = len(outs)
        interval_losses = torch.stack([out["interval_losses"][i] for i, out in enumerate(outs)])
        if self.kind == "ant_nash":
            loss = (self.objective.nash.alpha.to(interval_losses) * interval_losses).sum() / k
        else:
            loss = interval_losses.sum() / k  # PCGrad changes the gradient, not the loss
        # every interval has the same number of rows on a rank (stratified sampling): means of means
        return {"loss": loss, "mse": torch.stack([o["mse"] for o in outs]).mean(),
                "vb": torch.stack([o["vb"] for o in outs]).mean(), "interval_losses": interval_losses,
                "interval_counts": torch.stack([o["interval_counts"] for o in outs]).sum(0)}

    def log_values(self) -> dict:
        """The method's state for the metrics record: alpha (ANT-Nash) or conflicting pairs (PCGrad)."""
        if self.kind == "ant_nash":
            state = self.objective.nash
            return {"nash_alpha": state.alpha.tolist(), "nash_normalization": state.normalization.item(),
                    "nash_solved_at": int(state.solved_at.item())}
        return {"pcgrad_conflicting_pairs": self.conflicts}


def make_interval_gradient_step(cfg: TrainConfig, objective: TrainingObjective, backend: Backend,
                                world: World) -> IntervalGradientStep | None:
    """The per-interval gradient step for weighting=ant_nash or pcgrad; None for the other weightings."""
    return IntervalGradientStep(cfg, objective, backend, world) if cfg.weighting.kind in ("ant_nash", "pcgrad") else None
