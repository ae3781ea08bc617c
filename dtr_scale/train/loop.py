"""The training loop, written once for every backend.

Each step's randomness (timesteps, noise, label dropout) is drawn for the whole
global batch from a generator seeded by (seed, step), and each rank takes its
rows. So the numbers of step k do not depend on the world size, on gradient
accumulation, or on whether the run was restarted before k; the data position
is the only other state a resume needs besides what the backend saves (model,
EMA, optimizer, ANT-UW log-variances) and the post-hoc EMA.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from dtr_scale.config import TrainConfig
from dtr_scale.data.synthetic import step_seed
from dtr_scale.diffusion.objective import TrainingObjective
from dtr_scale.eval.watcher import submit_at_save
from dtr_scale.plots.routing import ROUTING_PNG, write_routing_png
from dtr_scale.provenance import write_provenance
from dtr_scale.train.backends import make_backend
from dtr_scale.train.checkpoint import CheckpointManager
from dtr_scale.train.components import build_loader, build_model, build_objective, config_to_dict
from dtr_scale.train.ema import make_ema
from dtr_scale.train.lock import lock_run_dir
from dtr_scale.train.metrics import MetricsLogger, StepTimer
from dtr_scale.train.mtl import make_interval_gradient_step, max_grad_norm
from dtr_scale.train.phema_snapshots import PosthocEMATracker

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/Inf; the message names step, rank and interval losses."""


@dataclass
class TrainResult:
    status: str  # "finished" | "stopped"
    step: int
    run_dir: Path
    last_loss: float | None = None
    skipped_steps: int = 0


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
        return {"loss": out.loss, "mse": out.mse.mean(), "vb": out.vb.mean(),
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


@dataclass
class Counters:
    """Run-level counters that live in the checkpoint's meta."""

    images_seen: int = 0
    skipped_steps: int = 0
    loss_spikes: int = 0
    loss_mean: float | None = field(default=None)  # running mean of the unweighted loss, for spikes


def _mean_over_ranks(x: torch.Tensor, world: World) -> torch.Tensor:
    x = x.detach().float().cpu().clone()
    if world.size > 1:
        dist.all_reduce(x)
        x /= world.size
    return x


def _any_rank(flag: bool, world: World) -> bool:
    if world.size == 1:
        return bool(flag)
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _apply_config_lrs(param_groups: list[dict], cfg: TrainConfig) -> None:
    """The config's lr and weight decay win over the ones stored in a checkpoint."""
    values = {"model": (cfg.optimizer.lr, cfg.optimizer.weight_decay),
              "uw": (cfg.weighting.uw_lr, cfg.weighting.uw_weight_decay)}
    for group in param_groups:
        group["lr"], group["weight_decay"] = values[group["name"]]


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
        dist.init_process_group("cpu:gloo,cuda:nccl" if cfg.device == "cuda" else "gloo")
    if cfg.device == "cuda":
        torch.cuda.set_device(world.local_rank)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(run_dir, world)  # held until the finally below, or until this process dies
    if world.rank == 0:
        write_provenance(run_dir)  # on the machine that trains: commit, packages, hardware, one line per start
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    model = build_model(cfg)
    objective = build_objective(cfg)
    module = DiffusionTrainModule(model, objective)
    ema = make_ema(model)
    n_params = sum(p.numel() for p in model.parameters())  # before any sharding
    backend = make_backend(cfg, world)
    backend.setup(module, ema)
    interval_step = make_interval_gradient_step(cfg, objective, backend, world)  # ANT-Nash, PCGrad; else None
    phema = PosthocEMATracker(run_dir, model, cfg, world) if cfg.phema_stds else None
    if phema is not None:
        backend.extra_state["phema"] = phema.ema
    loader = build_loader(cfg, world.rank, world.size)
    checkpoints = CheckpointManager(run_dir, cfg.checkpoint, backend, world, on_commit=submit_at_save(cfg))

    counters = Counters()
    meta = checkpoints.load_latest()
    start = 0
    if meta is not None:
        start = meta["step"]
        loader.load_state_dict(meta["data"])
        counters = Counters(**meta["counters"])
        _apply_config_lrs(backend.param_groups, cfg)
        log.info("resumed at step %d from %s", start, run_dir / "checkpoints")

    def save(step: int, asynchronous: bool | None = None) -> None:
        meta = {"step": step, "data": loader.state_dict(), "counters": vars(counters),
                "world_size": world.size, "backend": cfg.backend.name, "config": config_to_dict(cfg)}
        if phema is not None:  # before the checkpoint commits: a resume from it finds the snapshot
            phema.maybe_snapshot(step, at_checkpoint=True)
        checkpoints.save(step, meta, asynchronous=asynchronous)

    metrics = MetricsLogger(run_dir, cfg, enabled=world.rank == 0, resume_step=start)
    timer = StepTimer(cfg.device)
    if world.rank == 0:
        log.info("training %s (%.2fM params, routing=%s, weighting=%s) on %s x%d for %d steps, global batch %d",
                 cfg.model.name, n_params / 1e6, cfg.routing.kind, cfg.weighting.kind, cfg.backend.name,
                 world.size, cfg.steps, cfg.global_batch_size)
        if model.routing is not None:  # routing.png: the masks this model routes with
            r = cfg.routing
            metrics.image("routing", write_routing_png(run_dir / ROUTING_PNG, model.routing.tables.cpu().numpy(),
                                                       r.kind, r.beta, r.alpha))

    step, loss_value = start, None
    accum = cfg.backend.grad_accum
    max_norm = max_grad_norm(cfg)
    bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=True if world.rank != 0 else None,
               dynamic_ncols=True)
    try:
        while step < cfg.steps:
            checkpoints.poll()
            if stop_requested is not None and _any_rank(stop_requested(), world):
                save(step, asynchronous=False)
                return TrainResult("stopped", step, run_dir, loss_value, counters.skipped_steps)
            timer.start("data")
            x0, y = next(loader)
            draws = draw_step(cfg, objective, step, world.rank, world.size)
            timer.start("forward_backward")
            if interval_step is not None and interval_step.due(step):
                outs = [interval_step.run(x0, y, draws, step, timer)]  # k per-interval gradients, combined
            else:
                outs = []
                for i, rows in enumerate(torch.arange(len(y)).chunk(accum)):
                    with backend.micro_step(last=i == accum - 1):
                        out = backend.forward(x0[rows], y[rows], draws.t[rows], draws.noise[rows], draws.drop[rows])
                        backend.backward(out["loss"] / accum)
                    outs.append({k: v.detach() for k, v in out.items()})
            timer.start("optimizer")
            grad_norm = backend.clip_grad_norm(max_norm)
            # one all-reduce per step for every reported scalar: loss, unweighted loss, mse, vb, intervals
            means = _mean_over_ranks(torch.cat([
                torch.stack([o["loss"] for o in outs]).mean()[None],
                torch.stack([o["mse"] + o["vb"] for o in outs]).mean()[None],
                torch.stack([o["mse"] for o in outs]).mean()[None],
                torch.stack([o["vb"] for o in outs]).mean()[None],
                torch.stack([o["interval_losses"] for o in outs]).nanmean(0),
            ]), world)
            loss, unweighted, interval_losses = means[0], means[1].item(), means[4:]
            if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                message = (f"step {step}, rank {world.rank}: loss {loss.item()}, grad norm {grad_norm.item()}; "
                           f"interval losses {interval_losses.tolist()}")
                counters.skipped_steps += 1
                if cfg.health.nan_policy == "stop" or counters.skipped_steps > cfg.health.max_skipped_steps:
                    raise NonFiniteLossError(message)
                log.warning("skipping non-finite step (%d skipped so far): %s", counters.skipped_steps, message)
                backend.skip()
            else:
                backend.step()
                backend.update_ema(cfg.ema_decay)
                if phema is not None:
                    phema.update(step + 1)
            step += 1
            counters.images_seen += cfg.global_batch_size
            loss_value = loss.item()
            _watch_spike(counters, unweighted, step, cfg)
            timer.stop()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if step % cfg.logging.every == 0 or step == cfg.steps:
                record = {
                    "step": step, "loss": loss_value, "unweighted_loss": unweighted,
                    "mse": means[2].item(), "vb": means[3].item(),
                    "interval_losses": interval_losses.tolist(), "grad_norm": grad_norm.item(),
                    "lr": backend.param_groups[0]["lr"], "images_seen": counters.images_seen,
                    "skipped_steps": counters.skipped_steps, "loss_spikes": counters.loss_spikes,
                    "checkpoint_blocked_s": checkpoints.blocked_seconds,
                    **timer.summary(cfg.global_batch_size),
                }
                if objective.uw is not None:
                    weights = objective.uw.weights()
                    record["uw_weights"] = getattr(weights, "full_tensor", lambda: weights)().tolist()
                if interval_step is not None:
                    record.update(interval_step.log_values())
                if cfg.device == "cuda":
                    record["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                metrics.write(record)
            # after the step's metrics line: a resume keeps the lines up to its checkpoint's step,
            # so a crash right after this commit must find this step's line already written
            timer.start("checkpoint")  # counted in the next logging interval
            if step % cfg.checkpoint.every == 0 or step == cfg.steps:
                save(step, asynchronous=False if step == cfg.steps else None)
            elif phema is not None:
                phema.maybe_snapshot(step, at_checkpoint=False)
        checkpoints.wait()
    finally:
        checkpoints.finish()  # after an error too: a save in flight is committed, not left .partial
        bar.close()
        metrics.close()
        if lock is not None:
            lock.release()
    return TrainResult("finished", step, run_dir, loss_value, counters.skipped_steps)


def _watch_spike(counters: Counters, loss: float, step: int, cfg: TrainConfig) -> None:
    """Log a loss far above its running mean; the mean is a slow EMA of finite losses."""
    if not math.isfinite(loss):
        return
    if counters.loss_mean is not None and loss > cfg.health.spike_factor * counters.loss_mean:
        counters.loss_spikes += 1
        log.warning("loss spike at step %d: %.4g is %.1fx the running mean %.4g",
                    step, loss, loss / counters.loss_mean, counters.loss_mean)
    counters.loss_mean = loss if counters.loss_mean is None else 0.99 * counters.loss_mean + 0.01 * loss
