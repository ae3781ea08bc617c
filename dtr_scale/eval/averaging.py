"""The weights the evaluator scores for one checkpoint and one averaging spec (SPEC section 6).

    ema            the trainer's per-step EMA, as saved in the checkpoint
    raw            the optimizer's weights of the checkpoint
    phema:<s>      EDM2 post-hoc EMA with sigma_rel = s at the checkpoint's step, least-squares
                   combined from the run's snapshots (RUN_DIR/phema) taken at or before that step
    window:<k>     the uniform mean of the raw weights of the last k complete checkpoints up to
                   this one (checkpoint averaging in the style of LAWA, Kaddour 2022)

A checkpoint lives at RUN_DIR/checkpoints/step_N, so its run directory, and with
it the snapshots and the other checkpoints, follow from its path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from dtr_scale.config import TrainConfig, parse_averaging
from dtr_scale.eval.phema import average_state_dicts, reconstruct, std_to_exp
from dtr_scale.eval.sample import load_model
from dtr_scale.models import DiT
from dtr_scale.train.checkpoint import complete_checkpoints, read_meta
from dtr_scale.train.components import build_model, config_from_dict
from dtr_scale.train.phema_snapshots import MissingSnapshotsError, require_snapshots

log = logging.getLogger(__name__)
SNAPSHOT_GLOB = "phema-*.safetensors"  # dtr_scale.train.phema_snapshots.snapshot_name; tmp files start with "."


class AveragingError(ValueError):
    """The weights of an averaging spec cannot be formed for a checkpoint; the message says why and what to change."""


def run_dir_of(checkpoint: str | Path) -> Path:
    """RUN_DIR of RUN_DIR/checkpoints/step_N."""
    return Path(checkpoint).resolve().parent.parent


def checkpoint_step(checkpoint: str | Path) -> int:
    return int(read_meta(checkpoint)["step"])


def averaged_model(checkpoint: str | Path, spec: str, *,
                   allow_missing_snapshots: bool = False) -> tuple[DiT, TrainConfig]:
    """The model (eval mode, CPU) with the weights `spec` names for `checkpoint`, and the run's config.
    phema:<s> first checks that every snapshot due by the checkpoint's step is there."""
    kind, arg = parse_averaging(spec)
    if kind in ("ema", "raw"):
        return load_model(checkpoint, use_ema=kind == "ema")
    cfg = config_from_dict(read_meta(checkpoint)["config"])
    step = checkpoint_step(checkpoint)
    if kind == "phema":
        try:  # (with none at all, posthoc_ema_state says how to get them)
            if any((run_dir_of(checkpoint) / "phema").glob(SNAPSHOT_GLOB)):
                require_snapshots(run_dir_of(checkpoint), cfg, step)
        except MissingSnapshotsError as err:
            if not allow_missing_snapshots:
                raise AveragingError(f"{spec}: {err} (or set eval.allow_missing_snapshots=true)") from None
            log.warning("%s: %s; reconstructing from the snapshots present", spec, err)
        state = posthoc_ema_state(run_dir_of(checkpoint), step, float(arg))
    else:
        state = window_state(run_dir_of(checkpoint), step, int(arg))
    model = build_model(cfg, load_init=False)
    model.load_state_dict(state)
    return model.eval(), cfg


class SafetensorsFile(Mapping):
    """A safetensors file's tensors, each read when asked for: combining hundreds of snapshots
    then holds one tensor of each in memory, not every snapshot of a DiT-XL."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with safe_open(str(path), "pt") as f:
            self.names = list(f.keys())
            self.metadata = f.metadata() or {}

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self.path), "pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def posthoc_snapshots(run_dir: str | Path, max_step: int) -> list[tuple[int, float, SafetensorsFile]]:
    """(step, sigma_rel, tensors) of the run's post-hoc EMA snapshots at steps <= max_step,
    ordered by step then sigma_rel. Step and sigma_rel come from the file's metadata (exact,
    where the file name rounds sigma_rel to 3 decimals)."""
    snapshots = []
    for path in sorted((Path(run_dir) / "phema").glob(SNAPSHOT_GLOB)):
        tensors = SafetensorsFile(path)
        step, std = int(tensors.metadata["step"]), float(tensors.metadata["std"])
        if step <= max_step:
            snapshots.append((step, std, tensors))
    return sorted(snapshots, key=lambda s: (s[0], s[1]))


def posthoc_ema_state(run_dir: str | Path, step: int, sigma_rel: float) -> dict[str, torch.Tensor]:
    """EDM2 post-hoc EMA with `sigma_rel` at `step`, from the snapshots up to that step."""
    snapshots = posthoc_snapshots(run_dir, step)
    if not snapshots:
        raise AveragingError(f"phema:{sigma_rel}: no post-hoc EMA snapshots at or before step {step} in "
                             f"{Path(run_dir) / 'phema'}; train with phema_stds set (e.g. [0.05, 0.10]) to "
                             f"write them, or score this run with 'ema' or 'raw'")
    return reconstruct([(s, float(std_to_exp(std)), tensors) for s, std, tensors in snapshots], sigma_rel, step)


def window_state(run_dir: str | Path, step: int, k: int) -> dict[str, torch.Tensor]:
    """Uniform mean of the raw weights of the last k complete checkpoints at steps <= step."""
    window = [path for s, path in complete_checkpoints(run_dir) if s <= step][-k:]
    if len(window) < k:
        raise AveragingError(f"window:{k} at step {step} needs {k} complete checkpoints up to that step, "
                             f"{run_dir} has {len(window)}; keep more (checkpoint.keep_last / keep_every) "
                             f"or use a smaller window")
    return average_state_dicts([load_model(path, use_ema=False)[0].state_dict() for path in window])
