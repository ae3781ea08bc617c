"""The training loop, written once.

Each step's randomness (timesteps, noise, label dropout) is drawn for the whole
global batch from a generator seeded by (seed, step), and each rank takes its
rows. So the numbers of step k do not depend on the world size or on whether
the run was restarted before k, and the data position is the only other state
a resume needs besides model, EMA, optimizer and the ANT-UW log-variances.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from dtr_scale.config import TrainConfig
from dtr_scale.data.synthetic import step_seed
from dtr_scale.diffusion.objective import TrainingObjective
from dtr_scale.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from dtr_scale.train.components import (
    build_loader,
    build_model,
    build_objective,
    build_optimizer,
    config_to_dict,
)
from dtr_scale.train.ema import make_ema, update_ema

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/Inf; the message names step, rank and interval losses."""


@dataclass
class TrainResult:
    status: str  # "finished" | "stopped"
    step: int
    run_dir: Path
    last_loss: float | None = None


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls) -> "World":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                   int(os.environ.get("WORLD_SIZE", 1)))


class DiffusionTrainModule(nn.Module):
    """Model + objective as one module, so data-parallel wrappers also reduce the
    gradients of the objective's own parameters (ANT-UW)."""

    def __init__(self, model: nn.Module, objective: TrainingObjective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x0, y, t, noise, drop) -> dict[str, torch.Tensor]:
        out = self.objective(self.model, x0, y, t, noise, force_drop_ids=drop)
        return {"loss": out.loss, "mse": out.mse, "vb": out.vb,
                "interval_losses": out.interval_losses, "interval_counts": out.interval_counts}


@dataclass
class StepDraws:
    t: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor


def draw_step(cfg: TrainConfig, objective: TrainingObjective, step: int, rank: int, world_size: int) -> StepDraws:
    """This rank's rows of the global batch's timesteps, noise and label-dropout mask for `step`."""
    g = torch.Generator().manual_seed(step_seed(cfg.seed, step, 1))
    batch = cfg.global_batch_size
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    t = objective.sample_timesteps(batch, g)
    noise = torch.randn(batch, *shape, generator=g)
    drop = (torch.rand(batch, generator=g) < cfg.model.class_dropout_prob).long()
    rows = slice(rank * batch // world_size, (rank + 1) * batch // world_size)
    return StepDraws(t[rows], noise[rows], drop[rows])


def _reduce_mean(x: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world.size
    return x


class MetricsLog:
    """JSON lines in RUN_DIR/metrics.jsonl plus a line on the logger, from rank 0."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _state(module: DiffusionTrainModule, ema: nn.Module, optimizer, loader, step: int, cfg: TrainConfig) -> dict:
    return {
        "step": step,
        "model": module.model.state_dict(),
        "ema": ema.state_dict(),
        "objective": module.objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "data": loader.state_dict(),
        "config": config_to_dict(cfg),
    }


def train(cfg: TrainConfig, *, stop_requested: Callable[[], bool] | None = None) -> TrainResult:
    """Train to cfg.steps, resuming from the latest complete checkpoint in cfg.run_dir.

    `stop_requested` is polled at every step boundary (e.g. set by a preemption
    signal); when it is true on any rank, all ranks write a checkpoint at that
    step and return with status "stopped".
    """
    world = World.from_env()
    if world.size != cfg.world_size:
        raise ValueError(f"world_size: the config says {cfg.world_size} processes but WORLD_SIZE={world.size}; "
                         f"set world_size={world.size}")
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    model = build_model(cfg)
    objective = build_objective(cfg)
    module = DiffusionTrainModule(model, objective)
    ema = make_ema(model)
    optimizer = build_optimizer(model, objective, cfg)
    loader = build_loader(cfg, world.rank, world.size)

    start = 0
    resume_from = latest_checkpoint(run_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        _apply_config_lrs(optimizer, cfg)  # the config's lr wins over the checkpoint's
        loader.load_state_dict(state["data"])
        start = state["step"]
        log.info("resumed from %s at step %d", resume_from, start)

    wrapped = nn.parallel.DistributedDataParallel(module) if world.size > 1 else module
    metrics = MetricsLog(run_dir, enabled=world.rank == 0)
    if world.rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        log.info("training %s (%.2fM params, routing=%s, weighting=%s) for %d steps, global batch %d on %d process(es)",
                 cfg.model.name, n_params / 1e6, cfg.routing.kind, cfg.weighting.kind, cfg.steps,
                 cfg.global_batch_size, world.size)

    step, loss_value = start, None
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=True if world.rank != 0 else None, dynamic_ncols=True)
    window_start, window_images = time.perf_counter(), 0
    while step < cfg.steps:
        if stop_requested is not None and _any_rank(stop_requested(), world):
            _checkpoint(cfg, module, ema, optimizer, loader, step, world)
            bar.close()
            return TrainResult("stopped", step, run_dir, loss_value)
        x0, y = next(loader)
        draws = draw_step(cfg, objective, step, world.rank, world.size)
        out = wrapped(x0, y, draws.t, draws.noise, draws.drop)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        max_norm = cfg.optimizer.grad_clip if cfg.optimizer.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
        loss = _reduce_mean(out["loss"].detach(), world)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            raise NonFiniteLossError(
                f"step {step}, rank {world.rank}: loss {loss.item()}, grad norm {grad_norm.item()}; "
                f"interval losses {out['interval_losses'].tolist()}")
        optimizer.step()
        update_ema(ema, model, cfg.ema_decay)
        step += 1
        loss_value = loss.item()
        window_images += cfg.global_batch_size
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")

        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            record = {
                "step": step, "loss": loss_value,
                "mse": _reduce_mean(out["mse"].mean().detach(), world).item(),
                "vb": _reduce_mean(out["vb"].mean().detach(), world).item(),
                "interval_losses": _reduce_mean(out["interval_losses"], world).tolist(),
                "grad_norm": grad_norm.item(),
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": window_images / max(elapsed, 1e-9),
            }
            if objective.uw is not None:
                record["uw_weights"] = objective.uw.weights().tolist()
            metrics.write(record)
            window_start, window_images = time.perf_counter(), 0
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            _checkpoint(cfg, module, ema, optimizer, loader, step, world)
    bar.close()
    return TrainResult("finished", step, run_dir, loss_value)


def _apply_config_lrs(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    lrs = {"model": (cfg.optimizer.lr, cfg.optimizer.weight_decay),
           "uw": (cfg.weighting.uw_lr, cfg.weighting.uw_weight_decay)}
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = lrs[group["name"]]


def _any_rank(flag: bool, world: World) -> bool:
    if world.size == 1:
        return bool(flag)
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _checkpoint(cfg: TrainConfig, module, ema, optimizer, loader, step: int, world: World) -> None:
    if world.rank == 0:
        path = save_checkpoint(cfg.run_dir, step, _state(module, ema, optimizer, loader, step, cfg))
        log.info("saved %s", path)
    if world.size > 1:
        dist.barrier()
