"""The hardware figures the planner works from: the GPU types (dtr_scale.hardware: memory,
peak throughput) and `calibration.yaml`, shipped with this package: measured or estimated
training images/s per (GPU, model, precision, compile), and the assumptions used where
nothing was measured. Every figure carries its source.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
import yaml

from dtr_scale.config import BackendConfig, ConfigError, DataConfig, ModelConfig, TrainConfig
from dtr_scale.hardware import GPUS, GPUType
from dtr_scale.models.cost import FORWARDS_PER_TRAINING_STEP
from dtr_scale.train.loop import assemble, random_batch, timed_steps
from dtr_scale.world import World

CALIBRATION_FILE = files("dtr_scale.plan") / "calibration.yaml"
FORWARDS_WITH_RECOMPUTE = 4  # activation checkpointing runs every block's forward once more


@dataclass(frozen=True)
class Throughput:
    images_per_s: float | None  # training images/s per GPU; None: unknown
    source: str


@dataclass(frozen=True)
class Calibration:
    gpus: dict[str, GPUType]
    aliases: dict[str, str]
    assumed_mfu: dict[str, float]
    inter_node_busbw_gbs: float
    reserve_gib: float
    entries: list[dict[str, Any]]


def load_calibration(path: str | Path | None = None) -> Calibration:
    raw = yaml.safe_load((Path(path) if path else CALIBRATION_FILE).read_text())
    return Calibration(gpus=GPUS, aliases=raw["aliases"], assumed_mfu=raw["assumed_mfu"]["values"],
                       inter_node_busbw_gbs=raw["inter_node"]["busbw_gbs"], reserve_gib=raw["reserve_gib"],
                       entries=raw["throughput"])


def precision_key(backend: BackendConfig, gpu: str) -> str:
    """bf16 (autocast), tf32 (fp32 weights and TF32 matmuls, GPUs only) or fp32."""
    if backend.precision == "bf16":
        return "bf16"
    return "tf32" if backend.tf32 and gpu != "cpu" else "fp32"


def model_key(model: ModelConfig) -> str:
    """'DiT-L/2' for a preset at 256 px (32 x 32 latents); the preset and its changes otherwise."""
    changes = {"input_size": model.input_size} if model.input_size != 32 else {}
    changes.update(model.overrides())
    return model.name + ("[" + ",".join(f"{k}={v}" for k, v in changes.items()) + "]" if changes else "")


def mfu_key(precision: str, compiled: bool) -> str:
    return f"{precision}_compiled" if compiled and precision == "bf16" else precision


def estimated_images_per_s(forward_macs: int, peak_tflops: float, mfu: float) -> float:
    # images/s = MFU x peak FLOP/s / (3 forwards x 2 FLOPs per MAC x MACs per image)
    return mfu * peak_tflops * 1e12 / (FORWARDS_PER_TRAINING_STEP * 2 * forward_macs)


def is_measured(entry: dict[str, Any]) -> bool:
    return entry["source"].startswith("measured on")


def find_entry(cal: Calibration, gpu: str, model: str, precision: str,
               compiled: bool) -> tuple[int, dict[str, Any]] | None:
    """(index, entry) of the throughput entry for this key: the last measured one, else the last estimate."""
    key = (gpu, model, precision, compiled)
    matches = [(i, e) for i, e in enumerate(cal.entries)
               if (e["gpu"], e["model"], e["precision"], bool(e["compile"])) == key]
    measured = [m for m in matches if is_measured(m[1])]
    return (measured or matches or [None])[-1]


def training_throughput(cal: Calibration, gpu: str, model: str, precision: str, compiled: bool,
                        forward_macs: int) -> Throughput:
    """Training images/s per GPU: the table's entry (measured ones first), else an estimate from FLOPs
    and the assumed MFU. The source names the entry used."""
    found = find_entry(cal, gpu, model, precision, compiled)
    if found is not None:
        index, entry = found
        return Throughput(float(entry["images_per_s"]),
                          f"calibration.yaml: {entry['source']} (throughput entry {index + 1} of {len(cal.entries)})")
    peak = cal.gpus[gpu].peak_tflops.get(precision)
    if peak is None:
        return Throughput(None, f"unknown: calibration.yaml has no entry for ({gpu}, {model}, {precision}, "
                                f"compile={compiled}) and no peak for {gpu}; measure it with "
                                "dtr_scale.plan.calibration.measure_images_per_s and add an entry")
    mfu = cal.assumed_mfu[mfu_key(precision, compiled)]
    return Throughput(estimated_images_per_s(forward_macs, peak, mfu),
                      f"estimated, not measured: {forward_macs / 1e9:.1f} GMACs x 2 x {FORWARDS_PER_TRAINING_STEP} "
                      f"per image at an assumed {mfu:.0%} MFU of {gpu} {precision} peak {peak:g} TFLOPS")


def resolve_gpu_name(cal: Calibration, token: str) -> str | None:
    name = token.strip().lower().replace("-", "_")
    name = cal.aliases.get(name, name)
    return name if name in cal.gpus else None


def gpus_in_constraint(cal: Calibration, constraint: str | None) -> list[str]:
    """Known GPU types named in a SLURM --constraint expression (e.g. "a100|h100")."""
    tokens = re.split(r"[|&,()\[\]*\s]+", constraint or "")
    return sorted({g for g in (resolve_gpu_name(cal, t) for t in tokens if t) if g is not None})


def choose_gpu(cfg: TrainConfig, cal: Calibration, requested: str | None = None) -> tuple[str, str]:
    """(GPU type, why): the one asked for, else cluster.constraint's, CPU, or an H100 assumed."""
    cluster = cfg.cluster
    if requested:
        gpu = resolve_gpu_name(cal, requested)
        if gpu is None:
            raise ConfigError(f"--gpu: {requested!r} is not a GPU type in calibration.yaml; use one of "
                              f"{', '.join(cal.gpus)} or add the GPU there")
        return gpu, "as asked"
    if cfg.device == "cpu" or (cluster is not None and cluster.gpus_per_node == 0):
        return "cpu", "device=cpu"
    in_constraint = gpus_in_constraint(cal, cluster.constraint if cluster else None)
    if in_constraint:
        slowest = min(in_constraint, key=lambda g: (cal.gpus[g].peak_tflops.get("bf16", 0), cal.gpus[g].memory_gib))
        return slowest, (f"from cluster.constraint={cluster.constraint!r}" if len(in_constraint) == 1 else
                         f"the slowest and smallest of {', '.join(in_constraint)} in cluster.constraint")
    return "h100", "ASSUMED: cluster.constraint names no known GPU; plan for yours with --gpu TYPE"


def measure_images_per_s(cfg: TrainConfig, steps: int = 10, warmup: int = 3) -> float:
    """Training images/s of one process on cfg.device at the config's per-GPU batch: the trainer's
    own step (train.loop.train_step: forward, backward, clipping, the masked AdamW step, EMA and
    post-hoc EMA) through its backend (one process: the unwrapped module) with its speed switches,
    on random latents."""
    one = one_process(cfg)
    world = World(device=torch.device(cfg.device))
    with tempfile.TemporaryDirectory(prefix="dtr-calibration-") as run_dir:  # the run's own directory stays untouched
        parts = assemble(replace(one, run_dir=run_dir), world, load_init=False)
        batch = random_batch(one, world.device, one.global_batch_size)
        timed_steps(parts, batch, 0, warmup)
        seconds, _ = timed_steps(parts, batch, warmup, steps)
    return steps * one.global_batch_size / seconds


def one_process(cfg: TrainConfig) -> TrainConfig:
    """cfg as one process training its per-GPU batch in one micro-step, on synthetic latents (a
    DeepSpeed config is timed through DDP's unwrapped module, as one process runs it)."""
    batch = cfg.micro_batch_size
    backend = replace(cfg.backend, grad_accum=1, name="ddp" if cfg.backend.name == "deepspeed" else cfg.backend.name)
    return replace(cfg, world_size=1, global_batch_size=batch, backend=backend,
                   data=DataConfig(kind="synthetic", num_samples=batch))
