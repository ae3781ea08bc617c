"""Typed configuration: the Hydra config groups under `dtr_scale/configs/` map onto these
dataclasses, and the code uses the dataclasses directly.

TrainConfig is the schema train.yaml extends (stored in Hydra's ConfigStore by
`dtr_scale.configs`), so Hydra rejects an unknown key or a wrong type while composing;
`to_train_config` checks a composed config against it again (also a key Hydra appended
with `+`), and each dataclass's `__post_init__` checks values, so a bad setting fails
before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# config imports nothing of the project (it is the bottom layer): the two facts of other
# layers that its checks need, the DiT size presets and DiT's DDIM spacing, live here and
# models.dit / diffusion.schedules import them from here.

# depth, hidden size and heads of the DiT paper's Table 1; patch size is the "/N".
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{patch}": {"depth": d, "hidden_size": c, "num_heads": h, "patch_size": patch}
    for size, (d, c, h) in _SIZES.items()
    for patch in (2, 4, 8)
}


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """DiT's / improved-DDPM's `space_timesteps(T, "ddimN")`: the smallest integer stride whose
    range from 0 holds exactly `steps` timesteps (0, 20, ..., 980 for 50 of 1000)."""
    for stride in range(1, num_timesteps):
        kept = list(range(0, num_timesteps, stride))
        if len(kept) == steps:
            return kept
    raise ValueError(f"diffusion.sampling_steps={steps}: no integer stride gives exactly {steps} DDIM steps "
                     f"out of {num_timesteps} (as in DiT); choose a count such as {num_timesteps // 20} "
                     f"or {num_timesteps // 4}")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names it."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"got {value!r}, expected one of {', '.join(choices)}")


@dataclass
class ModelConfig:
    name: str = "DiT-S/2"
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    # Optional overrides of the preset, for tiny models.
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    mlp_ratio: float | None = None
    # Released weights (official DiT names: a .pt state dict or .safetensors) to start a fresh
    # run from; a resume continues from its checkpoint and ignores this.
    init_from: str | None = None

    def __post_init__(self) -> None:
        _choice(self.name, "model.name", tuple(DIT_PRESETS))
        for key in ("input_size", "in_channels", "num_classes", *self.overrides()):
            _require(getattr(self, key) > 0, f"model.{key}", f"got {getattr(self, key)}, must be positive")
        _require(0.0 <= self.class_dropout_prob < 1.0, "model.class_dropout_prob", "must be in [0, 1)")
        patch = self.patch_size or DIT_PRESETS[self.name]["patch_size"]
        _require(self.input_size % patch == 0, "model.input_size",
                 f"{self.input_size} is not divisible by the patch size {patch}")
        heads = self.num_heads or DIT_PRESETS[self.name]["num_heads"]
        hidden = self.hidden_size or DIT_PRESETS[self.name]["hidden_size"]
        _require(hidden % heads == 0, "model.hidden_size", f"{hidden} is not divisible by num_heads={heads}")

    def overrides(self) -> dict[str, Any]:
        keys = ("depth", "hidden_size", "num_heads", "patch_size", "mlp_ratio")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class RoutingConfig:
    kind: str = "none"  # none | dtr | random
    beta: float = 0.8
    alpha: float = 4.0
    seed: int = 0  # for kind=random (R-TR)

    def __post_init__(self) -> None:
        _choice(self.kind, "routing.kind", ("none", "dtr", "random"))
        _require(0.0 < self.beta <= 1.0, "routing.beta", f"got {self.beta}, must be in (0, 1]")
        _require(self.alpha > 0.0, "routing.alpha", f"got {self.alpha}, must be > 0")


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000
    schedule: str = "linear"  # linear | cosine
    learn_sigma: bool = True
    prediction: str = "eps"  # eps | v | x0: the model's target (DiT, DTR: eps); sets the min-SNR form
    sampler: str = "ddpm"  # ddpm | ddim
    sampling_steps: int = 250
    ddim_eta: float = 0.0
    cfg_scale: float = 1.5
    guided_channels: str = "all"  # all | first3 (DiT's released code)

    def __post_init__(self) -> None:
        _choice(self.schedule, "diffusion.schedule", ("linear", "cosine"))
        _choice(self.prediction, "diffusion.prediction", ("eps", "v", "x0"))
        _choice(self.sampler, "diffusion.sampler", ("ddpm", "ddim"))
        _choice(self.guided_channels, "diffusion.guided_channels", ("all", "first3"))
        _require(self.num_timesteps >= 2, "diffusion.num_timesteps", "must be >= 2")
        _require(1 <= self.sampling_steps <= self.num_timesteps, "diffusion.sampling_steps",
                 f"got {self.sampling_steps}, must be in [1, {self.num_timesteps}]")
        _require(self.cfg_scale >= 1.0, "diffusion.cfg_scale", "must be >= 1 (1 disables guidance)")
        if self.sampler == "ddim":
            try:  # DiT's "ddimN" spacing exists only for some N
                ddim_timesteps(self.num_timesteps, self.sampling_steps)
            except ValueError as err:
                raise ConfigError(str(err)) from None


# weightings that combine the k per-interval gradients (ANT-Nash, PCGrad) rather than the losses
GRADIENT_WEIGHTINGS = ("ant_nash", "pcgrad")


@dataclass
class WeightingConfig:
    kind: str = "uniform"  # uniform | min_snr | p2 | ant_uw | ant_nash | pcgrad
    min_snr_gamma: float = 5.0
    p2_gamma: float = 1.0
    p2_k: float = 1.0
    # ANT interval clustering; intervals also drive per-interval loss logging.
    num_intervals: int = 8
    intervals: str = "uniform"  # uniform | snr_dp (ANT's programme) | snr_optimal (its objective's exact minimiser)
    stratified: bool = False  # stratified timestep sampling (forced on by ant_uw, ant_nash, pcgrad)
    uw_lr: float = 0.025
    uw_weight_decay: float = 0.0
    # ANT-Nash (Nash-MTL as in the ANT code): solve for the interval weights every `nash_update_every`
    # steps with at most `nash_max_iter` convex problems; clip the gradient to `nash_max_grad_norm`.
    nash_update_every: int = 25
    nash_max_iter: int = 20
    nash_max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _choice(self.kind, "weighting.kind", ("uniform", "min_snr", "p2", "ant_uw", "ant_nash", "pcgrad"))
        _choice(self.intervals, "weighting.intervals", ("uniform", "snr_dp", "snr_optimal"))
        _require(self.num_intervals >= 1, "weighting.num_intervals", "must be >= 1")
        _require(self.min_snr_gamma > 0, "weighting.min_snr_gamma", "must be > 0")
        _require(self.nash_update_every >= 1, "weighting.nash_update_every", "must be >= 1")
        _require(self.nash_max_iter >= 1, "weighting.nash_max_iter", "must be >= 1")
        _require(self.nash_max_grad_norm > 0, "weighting.nash_max_grad_norm", "must be > 0")

    @property
    def stratify(self) -> bool:
        return self.stratified or self.kind in ("ant_uw", *GRADIENT_WEIGHTINGS)


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float | None = None  # max global grad norm; None disables clipping

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optimizer.lr", "must be > 0")
        _require(self.grad_clip is None or self.grad_clip > 0, "optimizer.grad_clip", "must be > 0 or null")


@dataclass
class DataConfig:
    kind: str = "synthetic"  # synthetic | shards
    path: str | None = None  # shard directory, for kind=shards (the node-local cache with `remote`)
    # s3://bucket/prefix, gs://...: the prepared dataset in object storage, fetched shard by shard
    # into `path` on first read (mosaicml-streaming's downloaders), checked like local shards
    remote: str | None = None
    format: str = "mds"  # mds | webdataset
    num_workers: int = 0
    embedded: bool = False  # the digits: prepared into `path` on first use (a few seconds)
    # Train on the image or its horizontal flip, drawn per (seed, epoch, sample): DiT's augmentation
    # for ImageNet. Off for data whose mirror image is something else (handwritten digits).
    hflip: bool = True
    # synthetic: class-conditional Gaussian blobs with a known answer
    num_samples: int = 4096
    noise_std: float = 0.3

    def __post_init__(self) -> None:
        _choice(self.kind, "data.kind", ("synthetic", "shards"))
        _choice(self.format, "data.format", ("mds", "webdataset"))
        _require(self.kind != "shards" or bool(self.path), "data.path", "is required for data.kind=shards")


@dataclass
class BackendConfig:
    """How the model is distributed and which speed switches are on (bf16, compile, TF32 and
    activation checkpointing off by default: CPU first; fused AdamW on, on CPUs as on GPUs)."""

    name: str = "ddp"  # ddp | fsdp | deepspeed  (one process: ddp without a wrapper)
    zero_stage: int = 2  # deepspeed only: 1, 2 or 3
    precision: str = "fp32"  # fp32 | bf16 (autocast; fp32 master weights)
    grad_accum: int = 1  # micro-batches per step; the global batch stays the same
    compile: bool = False  # torch.compile each DiT block
    activation_checkpointing: bool = False  # recompute each block in backward
    tf32: bool = False
    fused_adamw: bool = True  # torch fused AdamW (CPU and CUDA): masks a non-finite step on the device
    deepspeed_overrides: dict[str, Any] = field(default_factory=dict)  # merged into the generated JSON

    def __post_init__(self) -> None:
        _choice(self.name, "backend.name", ("ddp", "fsdp", "deepspeed"))
        _choice(self.precision, "backend.precision", ("fp32", "bf16"))
        _require(self.zero_stage in (1, 2, 3), "backend.zero_stage", f"got {self.zero_stage}, DeepSpeed ZeRO has stages 1, 2, 3")
        _require(self.grad_accum >= 1, "backend.grad_accum", "must be >= 1")


@dataclass
class CheckpointConfig:
    every: int = 500  # steps
    keep_last: int = 3
    keep_every: int = 0  # also keep every M-th step's checkpoint forever; 0 = none
    async_save: bool = True  # DDP/FSDP: write in the background (torch.distributed.checkpoint)

    def __post_init__(self) -> None:
        _require(self.every >= 1, "checkpoint.every", "must be >= 1")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1 (the latest is needed to resume)")
        _require(self.keep_every >= 0, "checkpoint.keep_every", "must be >= 0")


@dataclass
class HealthConfig:
    nan_policy: str = "stop"  # stop | skip: what a NaN/Inf loss or gradient does
    max_skipped_steps: int = 100  # skip policy: stop after this many skipped steps
    spike_factor: float = 5.0  # log a spike when loss > factor x its running mean

    def __post_init__(self) -> None:
        _choice(self.nan_policy, "health.nan_policy", ("stop", "skip"))


@dataclass
class LoggingConfig:
    every: int = 50  # steps
    wandb: str = "offline"  # offline | online | disabled
    project: str = "dtr-scale"
    tensorboard: bool = False  # also write the metrics as TensorBoard events into RUN_DIR/tensorboard

    def __post_init__(self) -> None:
        _choice(self.wandb, "logging.wandb", ("offline", "online", "disabled"))
        _require(self.every >= 1, "logging.every", "must be >= 1")


EVAL_AVERAGING = ("ema", "raw", "phema", "window")


def parse_averaging(spec: str) -> tuple[str, float | None]:
    """'ema' | 'raw' | 'phema:<sigma_rel>' | 'window:<k>' -> (kind, argument)."""
    kind, _, arg = spec.partition(":")
    _choice(kind, "eval.averaging", EVAL_AVERAGING)
    needs_arg = kind in ("phema", "window")
    _require(bool(arg) == needs_arg, "eval.averaging",
             f"{spec!r}: write 'ema', 'raw', 'phema:<sigma_rel>' (e.g. phema:0.10) or 'window:<k checkpoints>'")
    try:
        value = float(arg) if needs_arg else None
    except ValueError:
        raise ConfigError(f"eval.averaging: {spec!r}: {arg!r} is not a number") from None
    _require(value is None or value > 0, "eval.averaging", f"{spec!r}: the argument must be > 0")
    return kind, value


@dataclass
class QuickEvalConfig:
    """The quick protocol: FID alone from fewer samples, the same sampler and CFG, at multiples
    of `every` (0: off): a cheap curve between the full protocol's points."""

    every: int = 0
    num_samples: int = 10_000

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.quick.every", "must be >= 0 (0 turns the quick protocol off)")
        _require(self.num_samples >= 2, "eval.quick.num_samples", "must be >= 2 (FID needs a covariance)")


@dataclass
class EvalConfig:
    """How the evaluator scores a run's checkpoints. The sampler (DDPM/DDIM, steps, CFG
    scale, guided channels) is `diffusion`'s. Two protocols: the full one (the paper's FID,
    sFID, IS, precision and recall from num_samples samples) and the optional quick one."""

    every: int = 50_000  # evaluate checkpoints at multiples of this step, and the latest one
    num_samples: int = 50_000
    batch_size: int = 64  # images per sampling batch, per process
    labels: str = "balanced"  # balanced (i % num_classes) | random (seeded, like DiT's sample_ddp)
    # Which weights each checkpoint is scored with: the trainer's per-step EMA, the raw
    # weights, a post-hoc EMA reconstructed for sigma_rel, or the mean of the last k checkpoints.
    averaging: list[str] = field(default_factory=lambda: ["ema"])
    reference: str | None = None  # ADM reference batch (.npz); null with embedded data: the digits
    inception: str | None = None  # FID Inception weights (pt_inception-2015-12-05-6726825d.pth)
    world_size: int = 1  # sampling processes per evaluation job
    # The process that trains the run, or follows its job, also scores due checkpoints as they
    # appear and the final one at the end. Off: evaluate with `dtr-scale eval` (e.g. as jobs).
    inline: bool = True
    # The trainer submits an evaluation job (on `cluster`, or local processes) for each due
    # checkpoint as soon as it is complete, instead of a watcher job following the run.
    at_save: bool = False
    seed: int = 0  # sample i uses seed (seed, i): resumed or re-split jobs draw the same images
    # phema:<s> refuses to reconstruct from a grid with snapshots missing (a different EMA than
    # asked for); true reconstructs from the snapshots that are there, with a warning.
    allow_missing_snapshots: bool = False
    quick: QuickEvalConfig = field(default_factory=QuickEvalConfig)
    # The full protocol's steps (-1: the run's last step); null: every multiple of eval.every and
    # the last step. Their checkpoints are kept whatever checkpoint.keep_last says.
    milestones: list[int] | None = None
    pr_arithmetic: str = "adm"  # precision/recall distances: adm (ADM's float16 numbers) | exact (float64)

    def __post_init__(self) -> None:
        _require(self.every >= 1, "eval.every", "must be >= 1")
        _require(self.milestones is None or all(m == -1 or m >= 1 for m in self.milestones), "eval.milestones",
                 f"{self.milestones}: steps >= 1, or -1 for the last step")
        _choice(self.pr_arithmetic, "eval.pr_arithmetic", ("adm", "exact"))
        _require(self.num_samples >= 1, "eval.num_samples", "must be >= 1")
        _require(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _require(self.world_size >= 1, "eval.world_size", "must be >= 1")
        _choice(self.labels, "eval.labels", ("balanced", "random"))
        _require(len(self.averaging) >= 1, "eval.averaging", "name at least one, e.g. [ema]")
        for spec in self.averaging:
            parse_averaging(spec)

    def milestone_steps(self, last_step: int) -> set[int]:
        """eval.milestones with -1 read as `last_step` (empty without milestones)."""
        return {last_step if m == -1 else m for m in self.milestones or ()}

    def due_protocols(self, step: int, last_step: int, *, newest_of_finished: bool = False) -> list[str]:
        """The protocols that score checkpoint `step`: "full" at the milestones (without them,
        multiples of `every`), "quick" at multiples of quick.every; newest_of_finished: the last
        checkpoint of a finished run, scored by the quick protocol and (without milestones, or
        with -1 among them) the full one even off those multiples."""
        if self.milestones is None:
            full = step % self.every == 0 or newest_of_finished
        else:
            full = step in self.milestone_steps(last_step) or (newest_of_finished and -1 in self.milestones)
        quick = self.quick.every > 0 and (step % self.quick.every == 0 or newest_of_finished)
        return [name for name, due in (("full", full), ("quick", quick)) if due]


CLUSTER_KINDS = ("local", "slurm")


@dataclass
class ClusterConfig:
    """Where and how a run is launched (the `cluster` group): `kind: local` runs the job
    as local processes through submitit's local executor, `kind: slurm` submits it with
    sbatch. One task per GPU: on GPUs `tasks_per_node` equals `gpus_per_node`; on CPU it
    is the number of processes."""
    kind: str = "local"  # local | slurm
    folder: str | None = None  # submitit logs and pickles; default <run_dir>/submitit
    job_name: str = "dtr-scale"
    # Stay attached after submitting: progress, evaluation in this process, the summary at
    # the end (Ctrl-C cancels the job). null: yes for kind=local, no for kind=slurm.
    follow: bool | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: gpus_per_node, or 1 without GPUs
    cpus_per_task: int | None = None
    mem_gb: float | None = None  # per node; null leaves it to the cluster's default
    time_min: int = 60  # wall-clock limit of one job; longer runs requeue themselves
    # The preemption/time-limit signal (USR2) comes this long before the limit;
    # it must cover one training step plus writing a checkpoint.
    signal_delay_s: int = 120
    # Time-limit requeues allowed; null sizes it from the run length (steps x step_seconds).
    max_requeues: int | None = None
    step_seconds: float = 1.0  # expected wall seconds per training step, for max_requeues
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module load, ...)
    sbatch_extra: dict[str, Any] = field(default_factory=dict)  # any other #SBATCH --key=value (true: bare --key)

    def __post_init__(self) -> None:
        _require(self.kind in CLUSTER_KINDS, "cluster.kind", f"got {self.kind!r}, expected one of {', '.join(CLUSTER_KINDS)}")
        _require(self.nodes >= 1, "cluster.nodes", f"got {self.nodes}, must be >= 1")
        _require(self.kind != "local" or self.nodes == 1, "cluster.nodes",
                 "the local executor runs on one machine; set nodes=1 or use kind=slurm")
        _require(self.gpus_per_node >= 0, "cluster.gpus_per_node", f"got {self.gpus_per_node}, must be >= 0")
        if self.tasks_per_node is None:
            self.tasks_per_node = self.gpus_per_node or 1
        _require(self.tasks_per_node >= 1, "cluster.tasks_per_node", f"got {self.tasks_per_node}, must be >= 1")
        _require(self.gpus_per_node == 0 or self.tasks_per_node == self.gpus_per_node, "cluster.tasks_per_node",
                 f"got {self.tasks_per_node} with gpus_per_node={self.gpus_per_node}; training runs one task "
                 f"per GPU, so set tasks_per_node={self.gpus_per_node} (or leave it null)")
        _require(self.cpus_per_task is None or self.cpus_per_task >= 1, "cluster.cpus_per_task", "must be >= 1 or null")
        _require(self.mem_gb is None or self.mem_gb > 0, "cluster.mem_gb", "must be > 0 or null")
        _require(self.time_min >= 1, "cluster.time_min", f"got {self.time_min}, must be >= 1 minute")
        _require(0 < self.signal_delay_s < self.time_min * 60, "cluster.signal_delay_s",
                 f"got {self.signal_delay_s}, must be in (0, time_min * 60 = {self.time_min * 60})")
        _require(self.max_requeues is None or self.max_requeues >= 0, "cluster.max_requeues", "must be >= 0 or null")
        _require(self.step_seconds > 0, "cluster.step_seconds", f"got {self.step_seconds}, must be > 0")

    @property
    def follows(self) -> bool:
        return self.kind == "local" if self.follow is None else self.follow

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig | None = None  # null: train in this process; else submit through submitit
    run_dir: str = "runs/default"
    # Resume from this checkpoint instead of the latest: STEP (RUN_DIR/checkpoints/step_STEP) or the
    # path of a checkpoint directory, possibly of another run (dtr_scale/train/resume_from.py)
    resume_from: str | None = None
    seed: int = 0
    steps: int = 1000
    global_batch_size: int = 256
    world_size: int = 1
    ema_decay: float = 0.9999
    phema_stds: tuple[float, ...] = (0.05, 0.10)  # EDM2 post-hoc EMA profiles tracked; () = off
    phema_every: int = 0  # steps between post-hoc EMA snapshots; 0 = at every checkpoint
    sample_at_end: int = 16  # synthetic data: samples checked against their class pattern at the end; 0 = none
    device: str = "cpu"

    def __post_init__(self) -> None:
        _require(self.steps >= 1, "steps", "must be >= 1")
        _require(self.resume_from is None or self.resume_from.strip() != "", "resume_from",
                 "is empty: give a checkpoint's step (resume_from=2000) or its directory, or leave it out")
        _require(0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1)")
        _require(self.global_batch_size % self.world_size == 0, "global_batch_size",
                 f"{self.global_batch_size} is not divisible by world_size={self.world_size}")
        _require(self.cluster is None or self.cluster.world_size == self.world_size, "cluster.tasks_per_node",
                 f"the cluster gives nodes x tasks_per_node = {self.cluster and self.cluster.world_size} processes "
                 f"but world_size={self.world_size}; make them equal")
        _require(self.model.learn_sigma == self.diffusion.learn_sigma, "diffusion.learn_sigma",
                 "must equal model.learn_sigma")
        _require(not (self.phema_stds and self.backend.name == "deepspeed" and self.backend.zero_stage == 3),
                 "phema_stds", "post-hoc EMA tracking does not support ZeRO-3's partitioned parameters yet; "
                 "set phema_stds=[] or use backend.zero_stage 1/2 or backend=fsdp")
        split = self.world_size * self.backend.grad_accum
        _require(self.global_batch_size % split == 0, "global_batch_size",
                 f"{self.global_batch_size} is not divisible by world_size x backend.grad_accum = "
                 f"{self.world_size} x {self.backend.grad_accum}")
        micro = self.global_batch_size // split
        k = self.weighting.num_intervals
        _require(not self.weighting.stratify or micro % k == 0, "global_batch_size",
                 f"per-rank batch {micro} (= {self.global_batch_size} / world_size {self.world_size}"
                 f" / grad_accum {self.backend.grad_accum}) is not divisible by weighting.num_intervals={k}; "
                 f"stratified timestep sampling puts per-rank batch/k samples in each interval, so choose a "
                 f"global_batch_size that is a multiple of world_size x grad_accum x num_intervals = {split * k}")
        if self.weighting.kind in GRADIENT_WEIGHTINGS:
            _require(self.backend.name != "deepspeed", "backend.name",
                     f"weighting={self.weighting.kind} needs the k per-interval gradients, which DeepSpeed ZeRO "
                     f"does not expose; use backend=ddp or backend=fsdp")
            _require(self.backend.grad_accum == 1, "backend.grad_accum",
                     f"weighting={self.weighting.kind} takes the k per-interval gradients over the whole per-rank "
                     f"batch; set backend.grad_accum=1 (use more processes, or activation checkpointing, for memory)")

    @property
    def micro_batch_size(self) -> int:
        return self.global_batch_size // (self.world_size * self.backend.grad_accum)


def appended_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """The keys of a typed config that its dataclasses do not declare: Hydra's `+key=value` appends
    them to a typed node, where OmegaConf.to_object would keep them as silent extra attributes."""
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []
    declared = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key in node.keys():
        child = node._get_node(key)
        if key not in declared:
            found.append(f"{prefix}{key}")
        elif isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            found.extend(appended_keys(child, f"{prefix}{key}."))
    return found


# Keys of earlier versions of the schema that their runs' saved configs (meta.json, .hydra/config.yaml) still
# hold; dropped when such a config is read back, so that those runs can still be evaluated and resumed.
RETIRED_KEYS = ("data.read_threads",)  # the loader's read hints (data/open_files.py) replaced its read threads


def without_retired_keys(saved: dict) -> dict:
    """A saved config without the keys in RETIRED_KEYS (a copy; the others untouched)."""
    kept = dict(saved)
    for key in RETIRED_KEYS:
        section, name = key.split(".")
        if isinstance(kept.get(section), dict) and name in kept[section]:
            kept[section] = {k: v for k, v in kept[section].items() if k != name}
    return kept


def to_train_config(cfg: DictConfig | dict) -> TrainConfig:
    """Validate a composed Hydra config against the schema and build the dataclasses."""
    try:
        if isinstance(cfg, DictConfig) and OmegaConf.get_type(cfg) is TrainConfig and not appended_keys(cfg):
            # Composed on the schema already (configs/train.yaml's defaults): its values were checked
            # as they were set, so only the dataclasses remain to build (3 ms, not a 45 ms re-merge).
            return OmegaConf.to_object(cfg)
        if isinstance(cfg, DictConfig):
            # As plain data: a key Hydra appended (`+routing.betta=...`) to a typed node is then
            # an unknown key of the schema, named by the merge below.
            cfg = OmegaConf.to_container(cfg, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        # OmegaConf names the full key; drop its multi-line object dump.
        raise ConfigError(str(err).splitlines()[0] + f" (key: {getattr(err, 'full_key', '?')})") from None


# What a run's checkpoints were trained with, and so what a resume must keep: the model, its
# routing and loss weighting, the noise process, the data stream and the seed and global batch
# that order it. Everything else (steps, evaluation, sampling, cluster, backend switches,
# logging, checkpoint policy, data.path of moved shards) may change when a run is resumed.
RESUME_FIXED = ("model", "routing", "weighting", "diffusion.num_timesteps", "diffusion.schedule",
                "diffusion.learn_sigma", "diffusion.prediction", "data.kind", "data.format", "data.embedded",
                "data.hflip", "data.num_samples", "data.noise_std", "seed", "global_batch_size")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat
    return {prefix.rstrip("."): node}


def resume_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """Compare the config a run's checkpoint was written with to the one resuming it:
    (changes that would break the resume, harmless changes), each 'key: old -> new'. Keys
    only one side has come from another version of the schema, not from the command line."""
    before, after = _flatten(saved), _flatten(current)
    breaking, harmless = [], []
    for key in sorted(before.keys() & after.keys()):
        old, new = before[key], after[key]
        if old == new or key == "run_dir":
            continue
        change = f"{key}: {old!r} -> {new!r}"
        fixed = any(key == f or key.startswith(f + ".") for f in RESUME_FIXED)
        (breaking if fixed else harmless).append(change)
    return breaking, harmless
