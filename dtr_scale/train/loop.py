"""Training, as torchtitan's trainer has it: `assemble` builds the parts of a run from the
config, `train_step` is one optimizer step, and `train` is the run's lifecycle. Everything
that times or measures training (dtr-bench gpu / train / overhead, the planner's
calibration) calls the same `train_step`.

Each step's randomness (timesteps, noise, label dropout) is drawn for the whole
global batch from a generator seeded by (seed, step), and each rank takes its
rows. So the numbers of step k do not depend on the world size, on gradient
accumulation, or on whether the run was restarted before k; the data position
is the only other state a resume needs besides what the backend saves (model,
EMA, optimizer, ANT-UW log-variances) and the post-hoc EMA. The generator lives
on the training device, so a run's numbers hold for one device type: a CPU run
and a GPU run of the same config draw different numbers.

Between log steps the host never waits for the device: the reported values stay
on the device, a non-finite loss or gradient norm skips the update there (the
optimizer step is masked, so the weights and optimizer state stay as they were),
and the host reads them at the next log step, checkpoint or post-hoc EMA
snapshot, where the NaN policy acts (with "stop", no later step updates the
weights either, so the run stops with the weights of the last finite step). A
stop request is agreed on by all ranks every STOP_POLL_EVERY steps (every step
with one process), so all ranks stop at the same step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from dtr_scale.config import TrainConfig
from dtr_scale.data.loader import DevicePrefetcher
from dtr_scale.diffusion.objective import TrainingObjective
from dtr_scale.hardware import device_peak_tflops
from dtr_scale.models import DiT
from dtr_scale.models.cost import dit_shape, forward_macs, model_flops_utilization
from dtr_scale.plots.routing import ROUTING_PNG, write_routing_png
from dtr_scale.provenance import write_provenance
from dtr_scale.rng import STEP_DRAWS_STREAM, step_seed
from dtr_scale.train.backends import Backend, make_backend
from dtr_scale.train.checkpoint import CheckpointManager, complete_checkpoints
from dtr_scale.train.components import (
    DiffusionTrainModule, build_loader, build_model, build_objective, config_to_dict,
)
from dtr_scale.train.ema import make_ema
from dtr_scale.train.lock import lock_run_dir
from dtr_scale.train.metrics import MetricsLogger, StepTimer
from dtr_scale.train.mtl import IntervalGradientStep, make_interval_gradient_step, max_grad_norm
from dtr_scale.train.phema import PosthocEMATracker
from dtr_scale.train.progress import loss_fields
from dtr_scale.world import World, full_tensor, process_group

log = logging.getLogger(__name__)

STOP_POLL_EVERY = 4  # steps between the ranks' agreement on a stop request (one host-side all-reduce)


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
class StepDraws:
    step: int
    t: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor


def draw_step(cfg: TrainConfig, objective: TrainingObjective, step: int, rank: int, world_size: int,
              device: torch.device | str = "cpu") -> StepDraws:
    """This rank's rows of the global batch's timesteps, noise and label-dropout mask for `step`,
    drawn on `device` (the same numbers on every device of one type, not across types)."""
    g = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, STEP_DRAWS_STREAM))
    batch = cfg.global_batch_size
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    t = objective.sample_timesteps(batch, g)
    noise = torch.randn(batch, *shape, generator=g, device=g.device)
    drop = (torch.rand(batch, generator=g, device=g.device) < cfg.model.class_dropout_prob).long()
    rows = slice(rank * batch // world_size, (rank + 1) * batch // world_size)
    return StepDraws(step, t[rows], noise[rows], drop[rows])


@dataclass
class Counters:
    """Run-level counters that live in the checkpoint's meta."""

    images_seen: int = 0
    skipped_steps: int = 0
    loss_spikes: int = 0
    loss_mean: float | None = field(default=None)  # running mean of the unweighted loss, for spikes

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(vars(Counters(**state)))  # an unknown key is a TypeError naming it


@dataclass
class StepValues:
    """A trained step's reported values, still on the device until the next host check."""

    step: int  # the step's index: `step + 1` steps are done after it
    values: torch.Tensor  # [loss, unweighted loss, mse, vb, *interval losses, grad norm], means over ranks


@dataclass
class Parts:
    """What a run trains with, built from the config by `assemble`; `train_step` uses these."""

    cfg: TrainConfig
    world: World
    model: DiT  # the bare model (before any wrapping), for its routing tables and size
    objective: TrainingObjective
    ema: nn.Module
    backend: Backend  # wraps model + objective and the EMA; owns the optimizer
    phema: PosthocEMATracker | None  # post-hoc EMA (cfg.phema_stds), else None
    loader: DevicePrefetcher  # this rank's batches, the next one copied to the device ahead
    interval_step: IntervalGradientStep | None  # ANT-Nash and PCGrad's k per-interval gradients, else None
    timer: StepTimer
    counters: Counters = field(default_factory=Counters)
    # non-finite steps counted on the device, so the mask needs no host sync; set from counters on resume
    skipped: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))

    @property
    def max_norm(self) -> float:
        return max_grad_norm(self.cfg)

    @property
    def allowed_skips(self) -> int:
        """Non-finite steps the run survives: none under nan_policy=stop."""
        return 0 if self.cfg.health.nan_policy == "stop" else self.cfg.health.max_skipped_steps


def assemble(cfg: TrainConfig, world: World, *, load_init: bool = True) -> Parts:
    """The run's parts: model (from model.init_from with `load_init`), objective, EMA, backend,
    post-hoc EMA and loader, with identical initial weights on every rank."""
    torch.manual_seed(cfg.seed)
    model, objective = build_model(cfg, load_init=load_init), build_objective(cfg)
    ema = make_ema(model)
    backend = make_backend(cfg, world)
    backend.setup(DiffusionTrainModule(model, objective), ema)
    phema = PosthocEMATracker(Path(cfg.run_dir), model, cfg, world) if cfg.phema_stds else None
    loader = DevicePrefetcher(build_loader(cfg, world.rank, world.size), world.device)
    return Parts(cfg, world, model, objective, ema, backend, phema, loader,
                 make_interval_gradient_step(cfg, objective, backend, world), StepTimer(cfg.device),
                 skipped=torch.zeros((), dtype=torch.long, device=world.device))


def train_step(parts: Parts, batch: tuple[torch.Tensor, torch.Tensor], draws: StepDraws) -> StepValues:
    """One optimizer step on this rank's `batch`: forward and backward (over backend.grad_accum
    micro-batches, or ANT-Nash / PCGrad's k per-interval gradients combined), the global gradient
    norm and clipping, the optimizer step (masked on the device for a non-finite step), the EMA
    and the post-hoc EMA. Nothing here waits for the device."""
    cfg, backend, timer = parts.cfg, parts.backend, parts.timer
    x0, y = batch
    timer.start("forward_backward")
    if parts.interval_step is not None and parts.interval_step.due(draws.step):
        outs = [parts.interval_step.run(x0, y, draws, draws.step, timer)]  # k per-interval gradients, combined
    else:
        outs = accumulate_gradients(backend, x0, y, draws, cfg.backend.grad_accum)
    timer.start("optimizer")
    values = step_values(outs, backend.clip_grad_norm(parts.max_norm), parts.world)
    # a non-finite step leaves weights and optimizer state as they were; the EMAs still
    # take the step, with those unchanged weights
    backend.step(update_allowed(values, parts.skipped, parts.allowed_skips))
    backend.update_ema(cfg.ema_decay)
    if parts.phema is not None:
        parts.phema.update(draws.step + 1)
    return StepValues(draws.step, values)


def timed_steps(parts: Parts, batch: tuple[torch.Tensor, torch.Tensor], first: int,
                count: int) -> tuple[float, list[StepValues]]:
    """`count` train_steps from step `first` on one fixed batch, as the benchmarks and the
    planner's calibration time them: wall seconds (the device synchronised at both ends) and
    the steps' values."""
    world, values = parts.world, []
    synchronize(world.device)
    began = time.perf_counter()
    for step in range(first, first + count):
        draws = draw_step(parts.cfg, parts.objective, step, world.rank, world.size, world.device)
        values.append(train_step(parts, batch, draws))
    synchronize(world.device)
    return time.perf_counter() - began, values


def random_batch(cfg: TrainConfig, device: torch.device, batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random latents and labels of the configured shape on `device`, for timing steps."""
    m, g = cfg.model, torch.Generator(device=device).manual_seed(seed)
    x0 = torch.randn(batch, m.in_channels, m.input_size, m.input_size, device=device, generator=g)
    return x0, torch.randint(0, m.num_classes, (batch,), device=device, generator=g)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accumulate_gradients(backend: Backend, x0: torch.Tensor, y: torch.Tensor, draws: StepDraws,
                         accum: int) -> list[dict[str, torch.Tensor]]:
    """Forward and backward over `accum` micro-batches of the rank's batch, each loss divided by
    `accum`, gradients reduced over ranks after the last; the micro-batches' detached outputs."""
    outs, micro = [], len(y) // accum  # the config makes the batch divide into accum
    for i in range(accum):
        rows = slice(i * micro, (i + 1) * micro)  # a slice, not an index tensor: no copy to the device
        with backend.micro_step(last=i == accum - 1):
            out = backend.forward(x0[rows], y[rows], draws.t[rows], draws.noise[rows], draws.drop[rows])
            backend.backward(out["loss"] / accum)
        outs.append({k: v.detach() for k, v in out.items()})
    return outs


def step_values(outs: list[dict[str, torch.Tensor]], grad_norm: torch.Tensor, world: World) -> torch.Tensor:
    """The step's reported scalars as one device tensor, averaged over ranks by one all-reduce
    issued on the device (the host does not wait for it); the global gradient norm last."""
    # few small ops: on a small model each costs as much as the numbers it moves
    scalars = torch.stack([torch.stack([o["loss"], o["mse"] + o["vb"], o["mse"], o["vb"]]) for o in outs]).mean(0)
    intervals = torch.stack([o["interval_losses"] for o in outs]).nanmean(0)
    x = torch.cat([scalars.float(), intervals.float()]).detach()
    if world.size > 1:
        dist.all_reduce(x)
        x /= world.size
    return torch.cat([x, grad_norm.detach().float().reshape(1).to(x.device)])


def update_allowed(values: torch.Tensor, skipped: torch.Tensor, allowed: int) -> torch.Tensor:
    """Whether this step may update the weights, on the device: its loss and gradient norm are
    finite and the count of non-finite steps (`skipped`, updated in place) is within `allowed`
    (0 under nan_policy=stop: after one non-finite step no step updates until the run stops)."""
    finite = torch.isfinite(values[0]) & torch.isfinite(values[-1])
    skipped.add_((~finite).long())
    return finite & (skipped <= allowed)


def read_pending(pending: list[StepValues], counters: Counters, cfg: TrainConfig, world: World) -> list[float]:
    """The host check: read the pending steps' values (one device sync), count non-finite steps
    and loss spikes, and apply the NaN policy. Returns the last step's values."""
    rows = torch.stack([p.values for p in pending]).tolist()
    steps = [p.step for p in pending]
    pending.clear()
    for step, row in zip(steps, rows):
        loss, unweighted, grad_norm = row[0], row[1], row[-1]
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            counters.skipped_steps += 1
            message = (f"step {step}, rank {world.rank}: loss {loss}, grad norm {grad_norm}; "
                       f"interval losses {row[4:-1]}")
            if cfg.health.nan_policy == "stop" or counters.skipped_steps > cfg.health.max_skipped_steps:
                raise NonFiniteLossError(message)
            log.warning("skipped non-finite step (%d skipped so far): %s", counters.skipped_steps, message)
        _watch_spike(counters, unweighted, step + 1, cfg)
    return rows[-1]


def throughput_meter(cfg: TrainConfig, world: World) -> Callable[[dict], dict]:
    """Adds images/s per device and the model FLOPs utilisation to a StepTimer summary; MFU is
    None off a GPU of dtr_scale.hardware's table (on a CPU, or an unknown GPU)."""
    macs = forward_macs(dit_shape(cfg.model))
    peak = device_peak_tflops(world.device)
    if peak is None and world.device.type == "cuda":
        log.warning("no dense bf16 peak for %s in dtr_scale/hardware.py: MFU is not logged; add the GPU there",
                    torch.cuda.get_device_name(world.device))

    def add(summary: dict) -> dict:
        per_device = summary["images_per_s"] / world.size
        mfu = None if peak is None else model_flops_utilization(per_device, macs, peak)
        return {**summary, "images_per_s_per_device": per_device, "mfu": mfu}

    return add


def stop_agreed(flag: bool, step: int, world: World) -> bool:
    """Whether all ranks stop before `step`: any rank's flag, agreed on every STOP_POLL_EVERY
    steps by an all-reduce of a CPU tensor (gloo: the host waits for the other hosts, never
    for a GPU); with one process, at every step."""
    if world.size == 1:
        return flag
    if step % STOP_POLL_EVERY:
        return False
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _apply_config_lrs(param_groups: list[dict], cfg: TrainConfig) -> None:
    """The config's lr and weight decay win over the ones stored in a checkpoint."""
    values = {"model": (cfg.optimizer.lr, cfg.optimizer.weight_decay),
              "uw": (cfg.weighting.uw_lr, cfg.weighting.uw_weight_decay)}
    for group in param_groups:
        group["lr"], group["weight_decay"] = values[group["name"]]


def checkpoint_manager(parts: Parts, on_commit: Callable[[Path, int], None] | None) -> CheckpointManager:
    """The run's checkpoints, holding the data position, the counters and the post-hoc EMA, whose
    snapshots are written before each checkpoint commits (a resume from it finds them); the
    eval.milestones' checkpoints are kept whatever checkpoint.keep_last says (the full protocol scores them)."""
    cfg, phema = parts.cfg, parts.phema
    before_commit = None if phema is None else (lambda step: phema.maybe_snapshot(step, at_checkpoint=True))
    checkpoints = CheckpointManager(cfg.run_dir, cfg.checkpoint, parts.backend, parts.world, last_step=cfg.steps,
                                    keep_steps=cfg.eval.milestone_steps(cfg.steps),
                                    on_commit=on_commit, before_commit=before_commit)
    checkpoints.register("data", parts.loader)
    checkpoints.register("counters", parts.counters)
    if phema is not None:
        checkpoints.register("phema", phema.ema, tensors=True)
    checkpoints.describe_run(world_size=parts.world.size, backend=cfg.backend.name, config=config_to_dict(cfg))
    return checkpoints


def resume(parts: Parts, checkpoints: CheckpointManager) -> int:
    """Load the latest complete checkpoint, if any: the step to start at. (resume_from is not read
    here: the launching command made its checkpoint the latest, once, so a requeue goes on from
    the run's newer ones; dtr_scale/train/resume_from.py.)"""
    meta = checkpoints.load_latest()
    if meta is None:
        return 0
    _apply_config_lrs(parts.backend.param_groups, parts.cfg)
    parts.skipped.fill_(parts.counters.skipped_steps)
    log.info("resumed at step %d from %s", meta["step"], checkpoints.root)
    return meta["step"]


def announce(parts: Parts, metrics: MetricsLogger) -> None:
    """Rank 0's opening line, and routing.png: the masks this model routes with."""
    cfg, model = parts.cfg, parts.model
    if parts.world.rank != 0:
        return
    log.info("training %s (%.2fM params, routing=%s, weighting=%s) on %s x%d for %d steps, global batch %d",
             cfg.model.name, sum(p.numel() for p in model.parameters()) / 1e6, cfg.routing.kind,
             cfg.weighting.kind, cfg.backend.name, parts.world.size, cfg.steps, cfg.global_batch_size)
    if model.routing is not None:
        r = cfg.routing
        metrics.image("routing", write_routing_png(Path(cfg.run_dir) / ROUTING_PNG,
                                                   model.routing.tables.cpu().numpy(), r.kind, r.beta, r.alpha))


def log_record(parts: Parts, step: int, last: list[float], checkpoints: CheckpointManager,
               cost: Callable[[dict], dict]) -> dict:
    """The metrics line of log step `step` from the last step's values (read by the host check)."""
    cfg, counters = parts.cfg, parts.counters
    record = {
        "step": step, "loss": last[0], "unweighted_loss": last[1], "mse": last[2], "vb": last[3],
        "interval_losses": last[4:-1], "grad_norm": last[-1],
        "lr": parts.backend.param_groups[0]["lr"], "images_seen": counters.images_seen,
        "skipped_steps": counters.skipped_steps, "loss_spikes": counters.loss_spikes,
        "checkpoint_blocked_s": checkpoints.blocked_seconds,
        **cost(parts.timer.summary(cfg.global_batch_size)),
    }
    if parts.objective.uw is not None:
        record["uw_weights"] = full_tensor(parts.objective.uw.weights()).tolist()
    if parts.interval_step is not None:
        record.update(parts.interval_step.log_values())
    if cfg.device == "cuda":
        record["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return record


def train(cfg: TrainConfig, *, stop_requested: Callable[[], bool] | None = None,
          on_checkpoint: Callable[[Path, int], None] | None = None) -> TrainResult:
    """Train to cfg.steps, resuming from the latest complete checkpoint in cfg.run_dir.

    `stop_requested` is polled at every step boundary (e.g. set by a preemption signal); once it
    is true on any rank, all ranks write a checkpoint at the next multiple of STOP_POLL_EVERY
    steps (at once with one process) and return with status "stopped". `on_checkpoint(directory,
    step)` is called on rank 0 once a checkpoint is complete (the evaluator's hook)."""
    world = World.from_env(cfg.device)
    if world.size != cfg.world_size:
        raise ValueError(f"world_size: the config says {cfg.world_size} processes but WORLD_SIZE={world.size}; "
                         f"set world_size={world.size}")
    with process_group(world, cfg.device), held_run_dir(cfg, world):
        parts = assemble(cfg, world, load_init=not complete_checkpoints(cfg.run_dir))  # a resume loads its own
        checkpoints = checkpoint_manager(parts, on_checkpoint)
        step = start = resume(parts, checkpoints)
        metrics = MetricsLogger(Path(cfg.run_dir), cfg, enabled=world.rank == 0, resume_step=start)
        announce(parts, metrics)
        cost, pending, last, stop = throughput_meter(cfg, world), [], None, False
        bar = tqdm(total=cfg.steps, initial=start, desc="train", disable=True if world.rank != 0 else None,
                   dynamic_ncols=True)
        try:
            while step < cfg.steps:
                checkpoints.poll()
                stop = stop or (stop_requested is not None and stop_requested())
                if stop_agreed(stop, step, world):
                    last = read_pending(pending, parts.counters, cfg, world) if pending else last
                    checkpoints.save(step, last=True)
                    return TrainResult("stopped", step, Path(cfg.run_dir), last and last[0], parts.counters.skipped_steps)
                parts.timer.start("data")
                batch = next(parts.loader)
                pending.append(train_step(parts, batch, draw_step(cfg, parts.objective, step, world.rank, world.size,
                                                                  world.device)))
                step += 1
                parts.counters.images_seen += cfg.global_batch_size
                parts.timer.stop()
                bar.update(1)
                log_step = step % cfg.logging.every == 0 or step == cfg.steps
                if log_step or snapshot_due(parts.phema, step) or checkpoints.due(step):
                    # the host reads the values here, before anything is logged or written from them
                    last = read_pending(pending, parts.counters, cfg, world)
                    bar.set_postfix(loss_fields({"mse": last[2], "loss": last[0]}))
                if log_step:
                    metrics.write(log_record(parts, step, last, checkpoints, cost))
                # after the step's metrics line: a resume keeps the lines up to its checkpoint's step,
                # so a crash right after this commit must find this step's line already written
                parts.timer.start("checkpoint")  # counted in the next logging interval
                if not checkpoints.save(step) and parts.phema is not None:
                    parts.phema.maybe_snapshot(step, at_checkpoint=False)
            checkpoints.wait()
        finally:
            checkpoints.finish()  # after an error too: a save in flight is committed, not left .partial
            bar.close()
            metrics.close()
    return TrainResult("finished", step, Path(cfg.run_dir), last and last[0], parts.counters.skipped_steps)


def snapshot_due(phema: PosthocEMATracker | None, step: int) -> bool:
    """Whether the post-hoc EMA writes a snapshot after `step` on its own schedule (phema_every)."""
    return phema is not None and phema.every > 0 and step % phema.every == 0


@contextlib.contextmanager
def held_run_dir(cfg: TrainConfig, world: World) -> Iterator[None]:
    """The run directory, created and locked for this job (until the block ends, or this process
    dies), with a provenance line for this start on rank 0."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.device == "cuda":
        torch.cuda.set_device(world.local_rank)
    lock = lock_run_dir(run_dir, world)
    try:
        if world.rank == 0:
            write_provenance(run_dir)  # on the machine that trains: commit, packages, hardware, one line per start
        yield
    finally:
        if lock is not None:
            lock.release()


def _watch_spike(counters: Counters, loss: float, step: int, cfg: TrainConfig) -> None:
    """Log a loss far above its running mean; the mean is a slow EMA of finite losses."""
    if not math.isfinite(loss):
        return
    if counters.loss_mean is not None and loss > cfg.health.spike_factor * counters.loss_mean:
        counters.loss_spikes += 1
        log.warning("loss spike at step %d: %.4g is %.1fx the running mean %.4g",
                    step, loss, loss / counters.loss_mean, counters.loss_mean)
    counters.loss_mean = loss if counters.loss_mean is None else 0.99 * counters.loss_mean + 0.01 * loss
