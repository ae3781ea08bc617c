"""What a run will cost before anything is submitted (time, GPU-hours, SLURM jobs, memory,
storage, evaluation), and an early ConfigError naming the key where its settings cannot work
together. `report.format_plan` turns the Plan into text.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from dtr_scale.config import ConfigError, TrainConfig
from dtr_scale.diffusion.schedules import make_betas, snr
from dtr_scale.diffusion.weighting import interval_boundaries, partition_cost, snr_interval_costs, snr_median_costs
from dtr_scale.launch.executor import max_requeues, requeue_budget
from dtr_scale.plan.calibration import (
    FORWARDS_PER_TRAINING_STEP,
    FORWARDS_WITH_RECOMPUTE,
    Calibration,
    GPUType,
    Throughput,
    choose_gpu,
    load_calibration,
    model_key,
    precision_key,
    training_throughput,
)
from dtr_scale.plan.memory import MemoryEstimate, estimate_memory
from dtr_scale.plan.model_cost import DiTShape, ParameterCount, count_parameters, dit_shape, forward_macs_breakdown
from dtr_scale.plan.storage import (
    DatasetSize,
    checkpoint_bytes,
    checkpoint_steps,
    checkpoints_kept,
    dataset_size,
    phema_snapshot_count,
)

GIB = 2**30
GB = 1e9


@dataclass(frozen=True)
class StepTime:
    compute_s: float
    communication_s: float
    hidden_s: float  # the part of communication overlapped with compute
    collective: str  # what is communicated, in words

    @property
    def seconds(self) -> float:
        return self.compute_s + self.communication_s - self.hidden_s


@dataclass(frozen=True)
class Jobs:
    job_minutes: int
    jobs: int
    needed_requeues: int
    configured_requeues: int
    recommended_requeues: int


@dataclass(frozen=True)
class EvalCost:
    """One evaluation protocol over the whole run: full (the paper's suite) or quick (FID alone)."""

    protocol: str
    num_samples: int
    forwards_per_point: int  # model forward passes of one image: samples x steps x CFG x averagings
    gpu_hours_per_point: float | None
    steps: list[int]  # the checkpoints it scores

    @property
    def points(self) -> int:
        return len(self.steps)

    @property
    def gpu_hours(self) -> float | None:
        return None if self.gpu_hours_per_point is None else self.points * self.gpu_hours_per_point


@dataclass(frozen=True)
class IntervalChoice:
    kind: str  # weighting.intervals: snr_dp (ANT's programme) | snr_optimal (the paper objective's minimiser)
    bounds: tuple[int, ...]
    cost: float  # the ANT paper's SNR clustering objective of these intervals (snr_median_costs)
    code_cost: float  # the same with ANT's code's interval centre (snr_interval_costs), which its programme uses


@dataclass
class Plan:
    steps: int
    world_size: int
    gpu: GPUType
    gpu_reason: str
    shape: DiTShape
    params: ParameterCount
    macs: dict[str, int]  # forward MACs per image, by part
    throughput: Throughput
    step: StepTime | None  # None: throughput unknown
    jobs: Jobs | None  # None: no cluster, or throughput unknown
    memory: MemoryEstimate
    dataset: DatasetSize
    checkpoint_bytes: int
    checkpoints_kept: int
    phema_profiles: int
    phema_snapshots: int
    evaluation: list[EvalCost]  # each protocol that scores some checkpoint
    intervals: list[IntervalChoice] = field(default_factory=list)  # both SNR clusterings, where one is used
    warnings: list[str] = field(default_factory=list)

    @property
    def forward_macs(self) -> int:
        return sum(self.macs.values())

    @property
    def wall_seconds(self) -> float | None:
        return None if self.step is None else self.step.seconds * self.steps

    @property
    def training_gpu_hours(self) -> float | None:
        return None if self.step is None else self.wall_seconds * self.world_size / 3600

    @property
    def phema_snapshot_bytes(self) -> int:
        return self.params.state_bytes * self.phema_profiles

    @property
    def storage_bytes(self) -> int:
        return (self.dataset.bytes + (self.checkpoints_kept + 1) * self.checkpoint_bytes
                + self.phema_snapshots * self.phema_snapshot_bytes)


# ---------------------------------------------------------------------------- checks


def check_schedule(cfg: TrainConfig) -> None:
    """Evaluation, checkpoints and run length that fit together."""
    e, c = cfg.eval.every, cfg.checkpoint.every
    if e % c:
        raise ConfigError(f"eval.every: {e} is not a multiple of checkpoint.every={c}; the evaluator scores the "
                          f"checkpoints at multiples of eval.every, and only multiples of {c} are saved: make "
                          f"eval.every a multiple of checkpoint.every")
    if cfg.steps < e:
        raise ConfigError(f"eval.every: the first evaluation (step {e}) comes after the last step ({cfg.steps}); "
                          f"lower eval.every or raise steps")


def check_placement(cfg: TrainConfig) -> None:
    """The device, the cluster's GPUs and its CPUs agree."""
    cluster = cfg.cluster
    if cluster is None:
        return
    if cfg.device == "cuda" and cluster.gpus_per_node == 0:
        raise ConfigError("cluster.gpus_per_node: 0 but device=cuda; give the job GPUs "
                          "(cluster.gpus_per_node=<GPUs per node>) or train on CPU with device=cpu")
    if cfg.device == "cpu" and cluster.gpus_per_node > 0:
        raise ConfigError(f"device: cpu, but the cluster reserves {cluster.gpus_per_node} GPUs per node; "
                          "set device=cuda or cluster.gpus_per_node=0")
    workers = cfg.data.num_workers
    if cluster.cpus_per_task is not None and cluster.cpus_per_task < workers + 1:
        raise ConfigError(f"cluster.cpus_per_task: {cluster.cpus_per_task} CPUs cannot run the training process "
                          f"and data.num_workers={workers} loader workers; set cpus_per_task >= {workers + 1} "
                          "or lower data.num_workers")


def check_memory(cfg: TrainConfig, memory: MemoryEstimate, gpu: GPUType) -> None:
    if gpu.memory_gib is None or memory.total <= gpu.memory_gib * GIB:
        return
    b = cfg.backend
    raise ConfigError(
        f"backend: {cfg.model.name} with backend {b.name}{f' ZeRO-{b.zero_stage}' if b.name == 'deepspeed' else ''} "
        f"at per-GPU batch {cfg.micro_batch_size} needs about {memory.total / GIB:.1f} GiB per GPU, more than "
        f"{gpu.name}'s {gpu.memory_gib:g} GiB; shard the training state (backend=fsdp or backend=deepspeed "
        f"backend.zero_stage=3), turn on backend.activation_checkpointing=true, or split the batch with "
        f"backend.grad_accum=2")


# ---------------------------------------------------------------------------- time


def collective_bytes_per_gpu(cfg: TrainConfig, params: ParameterCount) -> tuple[float, str]:
    # Ring collectives move 2(N-1)/N of a buffer per GPU for an all-reduce and (N-1)/N for an
    # all-gather or reduce-scatter (NCCL's bus-bandwidth convention).
    n, p, b = cfg.world_size, params.total, cfg.backend
    share = (n - 1) / n
    if b.name == "ddp":
        return 2 * share * 4 * p, "fp32 gradient all-reduce"
    if b.name == "fsdp":
        gathered = 2 if b.precision == "bf16" else 4
        return (share * (2 * gathered + 4) * p,
                "parameter all-gathers (forward, backward) + fp32 gradient reduce-scatter")
    if b.zero_stage == 3:
        return share * 12 * p, "fp32 parameter all-gathers (forward, backward) + gradient reduce-scatter"
    return share * 8 * p, "fp32 gradient reduce-scatter + updated-parameter all-gather"


def step_time(cfg: TrainConfig, params: ParameterCount, gpu: GPUType, cal: Calibration,
              images_per_s: float) -> StepTime:
    """Seconds per optimizer step on one GPU: compute at the calibrated rate, plus the collectives
    that compute does not hide (DDP and ZeRO overlap them with backward, FSDP with both passes)."""
    b = cfg.backend
    forwards = FORWARDS_WITH_RECOMPUTE if b.activation_checkpointing else FORWARDS_PER_TRAINING_STEP
    compute = cfg.global_batch_size / cfg.world_size / images_per_s * forwards / FORWARDS_PER_TRAINING_STEP
    volume, what = collective_bytes_per_gpu(cfg, params)
    multi_node = cfg.cluster is not None and cfg.cluster.nodes > 1
    busbw = cal.inter_node_busbw_gbs if multi_node else gpu.nvlink_busbw_gbs
    if cfg.world_size == 1 or busbw is None:
        return StepTime(compute, 0.0, 0.0, "none" if cfg.world_size == 1 else f"{what}: not modelled on {gpu.name}")
    comm = volume / (busbw * GB)
    overlappable = compute if b.name == "fsdp" else compute * (forwards - 1) / forwards
    where = "between nodes" if multi_node else "over NVLink"
    return StepTime(compute, comm, min(comm, overlappable),
                    f"{what}: {volume / GB:.2f} GB per GPU at {busbw:g} GB/s {where}")


def plan_jobs(cfg: TrainConfig, step_seconds: float) -> Jobs | None:
    cluster = cfg.cluster
    if cluster is None:
        return None
    # requeue_budget sizes 2 x segments + 3 requeues: invert it for the segments themselves, one formula.
    recommended = requeue_budget(cfg.steps, step_seconds, cluster.time_min, cluster.signal_delay_s)
    jobs = (recommended - 3) // 2
    return Jobs(cluster.time_min, jobs, jobs - 1, max_requeues(cluster, cfg.steps), recommended)


def eval_steps(cfg: TrainConfig) -> dict[str, list[int]]:
    """The checkpoints each protocol scores over the run (EvalConfig.due_protocols), the last
    step counted as the newest checkpoint of a finished run."""
    due: dict[str, list[int]] = {"full": [], "quick": []}
    for step in checkpoint_steps(cfg):
        for protocol in cfg.eval.due_protocols(step, cfg.steps, newest_of_finished=step == cfg.steps):
            due[protocol].append(step)
    return due


def eval_cost(cfg: TrainConfig, throughput: Throughput) -> list[EvalCost]:
    """Sampling cost of each protocol: samples x sampling steps x 2 with CFG (it doubles the
    batch) x averagings per point; the metrics' own cost is small beside it and not counted."""
    d, e = cfg.diffusion, cfg.eval
    forward_rate = None  # a forward is a third of a training step
    if throughput.images_per_s is not None:
        forward_rate = throughput.images_per_s * FORWARDS_PER_TRAINING_STEP
    costs = []
    for protocol, steps in eval_steps(cfg).items():
        samples = e.num_samples if protocol == "full" else e.quick.num_samples
        forwards = samples * d.sampling_steps * (2 if d.cfg_scale > 1 else 1) * len(e.averaging)
        hours = None if forward_rate is None else forwards / forward_rate / 3600
        costs.append(EvalCost(protocol, samples, forwards, hours, steps))
    return [cost for cost in costs if cost.steps]


def snr_interval_choices(cfg: TrainConfig) -> list[IntervalChoice]:
    """ANT's programme and the exact optimum of the paper's objective side by side, for a run whose
    weighting.intervals is SNR-based (none for uniform intervals)."""
    w, d = cfg.weighting, cfg.diffusion
    if w.intervals == "uniform":
        return []
    values = snr(np.cumprod(1 - make_betas(d.schedule, d.num_timesteps)))
    paper, code = snr_median_costs(values), snr_interval_costs(values)
    choices = []
    for kind in ("snr_dp", "snr_optimal"):
        bounds = interval_boundaries(kind, values, w.num_intervals)
        choices.append(IntervalChoice(kind, tuple(bounds.tolist()), partition_cost(paper, bounds),
                                      partition_cost(code, bounds)))
    return choices


# ---------------------------------------------------------------------------- plan


def make_plan(cfg: TrainConfig, gpu: str | None = None, calibration: Calibration | None = None) -> Plan:
    """Everything the report prints. Raises ConfigError on settings that cannot work together."""
    cfg = dataclasses.replace(cfg)  # reruns TrainConfig's own checks (batch vs intervals, ...) on edited configs
    check_schedule(cfg)
    check_placement(cfg)
    cal = calibration or load_calibration()
    gpu_name, reason = choose_gpu(cfg, cal, gpu)
    hardware = cal.gpus[gpu_name]
    shape, params = dit_shape(cfg.model), count_parameters(cfg)
    memory = estimate_memory(cfg, shape, params, 0.0 if hardware.memory_gib is None else cal.reserve_gib)
    check_memory(cfg, memory, hardware)
    macs = forward_macs_breakdown(shape)
    throughput = training_throughput(cal, gpu_name, model_key(cfg.model), precision_key(cfg.backend, gpu_name),
                                     cfg.backend.compile, sum(macs.values()))
    step = None if throughput.images_per_s is None else step_time(cfg, params, hardware, cal, throughput.images_per_s)
    plan = Plan(
        steps=cfg.steps, world_size=cfg.world_size, gpu=hardware, gpu_reason=reason, shape=shape, params=params,
        macs=macs, throughput=throughput, step=step,
        jobs=None if step is None else plan_jobs(cfg, step.seconds), memory=memory, dataset=dataset_size(cfg),
        checkpoint_bytes=checkpoint_bytes(cfg, params), checkpoints_kept=checkpoints_kept(cfg),
        phema_profiles=len(cfg.phema_stds), phema_snapshots=phema_snapshot_count(cfg),
        evaluation=eval_cost(cfg, throughput), intervals=snr_interval_choices(cfg),
    )
    plan.warnings = plan_warnings(plan)
    return plan


def plan_warnings(plan: Plan) -> list[str]:
    out = []
    if plan.gpu_reason.startswith("ASSUMED"):
        out.append(f"GPU type assumed to be {plan.gpu.name}: pass --gpu TYPE, or name it in cluster.constraint")
    if "estimated" in plan.throughput.source:
        out.append("throughput is an estimate, not a measurement: add a measured entry to calibration.yaml")
    if plan.step is not None and plan.step.communication_s - plan.step.hidden_s > plan.step.compute_s:
        exposed = plan.step.communication_s - plan.step.hidden_s
        out.append(f"communication-bound: {exposed / plan.step.seconds:.0%} of each step waits on collectives; "
                   f"fewer GPUs (a larger per-GPU batch) would spend fewer GPU-hours on the same run")
    if plan.jobs is not None and plan.jobs.configured_requeues < plan.jobs.needed_requeues:
        out.append(f"cluster.max_requeues: {plan.jobs.configured_requeues} time-limit requeues allowed, "
                   f"{plan.jobs.needed_requeues} needed; set cluster.step_seconds={plan.step.seconds:.2f} "
                   f"(or cluster.max_requeues={plan.jobs.recommended_requeues})")
    return out
