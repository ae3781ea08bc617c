"""EDM2 post-hoc EMA during training: track power-function EMAs and write
snapshots the evaluator combines into any EMA length after the run.

Snapshots: RUN_DIR/phema/phema-00050000-0.050.safetensors (step, sigma_rel),
full tensors written by rank 0, each atomically and durably. A snapshot due at
a checkpoint's step is written before that checkpoint commits, so every
snapshot due up to the checkpoint a run resumes from exists: a crash can lose
only snapshots past it, and the resumed run writes those again.
`snapshot_inventory` lists the expected and present snapshots, for an
evaluator that must refuse a reconstruction from an incomplete grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from dtr_scale.config import TrainConfig
from dtr_scale.eval.phema import PowerFunctionEMA
from dtr_scale.io import atomic_write_bytes


class MissingSnapshotsError(FileNotFoundError):
    """Post-hoc EMA snapshots that the run's config says were written are not on disk."""


def snapshot_name(step: int, std: float) -> str:
    return f"phema-{step:08d}-{std:.3f}.safetensors"


def snapshot_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "phema"


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 shards are DTensors


def snapshot_steps(cfg: TrainConfig, up_to_step: int) -> list[int]:
    """The steps at which a run with `cfg` writes snapshots, up to checkpoint step `up_to_step`:
    every `phema_every` steps, or (phema_every=0) at every checkpoint, `up_to_step` included.
    A checkpoint written by a stop between scheduled ones has a snapshot too, but only the one
    at `up_to_step` is known from the config."""
    if not cfg.phema_stds:
        return []
    if cfg.phema_every:
        return list(range(cfg.phema_every, up_to_step + 1, cfg.phema_every))
    return sorted(set(range(cfg.checkpoint.every, up_to_step + 1, cfg.checkpoint.every)) | {up_to_step} - {0})


@dataclass
class SnapshotInventory:
    expected: list[Path]  # the files the config says were written up to the step
    present: list[Path]  # the snapshot files on disk at steps up to the step

    @property
    def missing(self) -> list[Path]:
        on_disk = set(self.present)
        return [p for p in self.expected if p not in on_disk]


def snapshot_inventory(run_dir: str | Path, cfg: TrainConfig, up_to_step: int) -> SnapshotInventory:
    """Expected and present post-hoc EMA snapshots of a run up to checkpoint step `up_to_step`."""
    folder = snapshot_dir(run_dir)
    expected = [folder / snapshot_name(step, std) for step in snapshot_steps(cfg, up_to_step) for std in cfg.phema_stds]
    present = sorted(p for p in folder.glob("phema-*.safetensors") if int(p.name.split("-")[1]) <= up_to_step)
    return SnapshotInventory(expected, present)


def require_snapshots(run_dir: str | Path, cfg: TrainConfig, up_to_step: int) -> None:
    """Raise MissingSnapshotsError naming the snapshots missing from the grid up to `up_to_step`."""
    missing = snapshot_inventory(run_dir, cfg, up_to_step).missing
    if missing:
        names = ", ".join(p.name for p in missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise MissingSnapshotsError(
            f"{len(missing)} post-hoc EMA snapshot(s) due by step {up_to_step} are missing from "
            f"{snapshot_dir(run_dir)}: {names}. A reconstruction without them gives a different EMA; "
            f"retrain from the checkpoint before the first missing one to write them again")


class PosthocEMATracker:
    def __init__(self, run_dir: Path, model: nn.Module, cfg: TrainConfig, world):
        self.dir = snapshot_dir(run_dir)
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
            data = safetensors_bytes(state, metadata={"step": str(step), "std": str(std)})
            atomic_write_bytes(self.dir / snapshot_name(step, std), data)
