"""EDM2 post-hoc EMA during training: track power-function EMAs and write
snapshots the evaluator combines into any EMA length after the run.

Snapshots: RUN_DIR/phema/phema-00050000-0.050.safetensors (step, sigma_rel),
full tensors written by rank 0, each atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from dtr_scale.config import TrainConfig
from dtr_scale.eval.phema import PowerFunctionEMA


def snapshot_name(step: int, std: float) -> str:
    return f"phema-{step:08d}-{std:.3f}.safetensors"


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 shards are DTensors


class PosthocEMATracker:
    def __init__(self, run_dir: Path, model: nn.Module, cfg: TrainConfig, world):
        self.dir = Path(run_dir) / "phema"
        self.ema = PowerFunctionEMA(model, cfg.phema_stds)
        self.every = cfg.phema_every
        self.world = world

    def update(self, step: int) -> None:
        self.ema.update(step)

    def maybe_snapshot(self, step: int, *, at_checkpoint: bool) -> None:
        due = step % self.every == 0 if self.every else at_checkpoint
        if not due:
            return
        full = {std: {k: _full(v).detach().cpu().contiguous() for k, v in sd.items()}
                for std, sd in zip(self.ema.stds, self.ema.emas)}  # collective under FSDP: every rank
        if self.world.rank != 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for std, state in full.items():
            path = self.dir / snapshot_name(step, std)
            tmp = path.with_name(f".{path.name}.tmp")
            save_file(state, str(tmp), metadata={"step": str(step), "std": str(std)})
            os.replace(tmp, path)
