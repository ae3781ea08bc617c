"""Disk a run needs: its latent shards, the checkpoints it keeps, its post-hoc EMA snapshots."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dtr_scale.config import TrainConfig
from dtr_scale.data.shard_format import MANIFEST_NAME, read_manifest
from dtr_scale.plan.model_cost import ParameterCount
from dtr_scale.train.checkpoint import retained

IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC-2012 train
DIGITS_IMAGES = 1_797  # scikit-learn's digits, the embedded data set
STORED_DTYPE_BYTES = 2  # dtr-prep stores the posterior moments as float16 by default
FP32 = 4


@dataclass(frozen=True)
class DatasetSize:
    bytes: int
    source: str


def latent_shard_bytes(num_samples: int, latent_channels: int, latent_size: int, itemsize: int) -> int:
    # moments [2 (image, flip), 2C (posterior mean, std), h, w] per sample (data/shard_format.py)
    return num_samples * 2 * 2 * latent_channels * latent_size**2 * itemsize


def dataset_size(cfg: TrainConfig) -> DatasetSize:
    """The prepared shards' size: from their manifest where data.path holds one, else estimated."""
    d = cfg.data
    if d.kind != "shards":
        return DatasetSize(0, "synthetic data: generated in memory")
    if (Path(d.path) / MANIFEST_NAME).is_file():
        m = read_manifest(d.path)
        size = m["num_samples"] * math.prod(m["stored_shape"]) * np.dtype(m["dtype"]).itemsize
        return DatasetSize(size, f"{m['num_samples']:,} samples x {m['stored_shape']} {m['dtype']}, "
                                 f"from {Path(d.path) / MANIFEST_NAME}")
    name, count = ("the digits", DIGITS_IMAGES) if d.embedded else ("ImageNet-1k train", IMAGENET_TRAIN_IMAGES)
    c, s = cfg.model.in_channels, cfg.model.input_size
    return DatasetSize(latent_shard_bytes(count, c, s, STORED_DTYPE_BYTES),
                       f"estimated ({d.path} is not prepared yet): {name}, {count:,} images x 2 (flip) x "
                       f"{2 * c} (mean, std) x {s} x {s} fp16")


def checkpoint_bytes(cfg: TrainConfig, params: ParameterCount) -> int:
    """One checkpoint: model, EMA and post-hoc EMA profiles (fp32 state dicts), AdamW moments,
    DeepSpeed's fp32 optimizer partition, ANT-UW log-variances and their moments."""
    model_copies = 2 + len(cfg.phema_stds)
    optimizer_per_param = 3 * FP32 if cfg.backend.name == "deepspeed" else 2 * FP32
    uw = 3 * FP32 * cfg.weighting.num_intervals if cfg.weighting.kind == "ant_uw" else 0
    return model_copies * params.state_bytes + optimizer_per_param * params.total + uw


def checkpoint_steps(cfg: TrainConfig) -> list[int]:
    # The loop saves at multiples of checkpoint.every and at the last step (train/loop.py).
    every = cfg.checkpoint.every
    return sorted(set(range(every, cfg.steps + 1, every)) | {cfg.steps})


def checkpoints_kept(cfg: TrainConfig) -> int:
    """Checkpoints on disk at the end of the run under the retention policy, the full evaluation's
    milestones among them (one more while writing)."""
    c, steps = cfg.checkpoint, checkpoint_steps(cfg)
    return len(retained(steps, c.keep_last, c.keep_every) | cfg.eval.milestone_steps(cfg.steps).intersection(steps))


def phema_snapshot_count(cfg: TrainConfig) -> int:
    """Post-hoc EMA snapshot steps (each writes one fp32 state dict per sigma_rel, kept for good)."""
    if not cfg.phema_stds:
        return 0
    if cfg.phema_every:
        return cfg.steps // cfg.phema_every
    return len(checkpoint_steps(cfg))
