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
from pathlib import Path

import torch

from dtr_scale.config import TrainConfig, parse_averaging
from dtr_scale.models import DiT
from dtr_scale.train.backends import read_weights
from dtr_scale.train.checkpoint import CheckpointInfo, complete_checkpoints, open_checkpoint, require_complete
from dtr_scale.train.components import build_model
from dtr_scale.train.phema import (SNAPSHOT_GLOB, MissingSnapshotsError, average_state_dicts, read_snapshots,
                                   reconstruct, require_snapshots, snapshot_dir, std_to_exp)

log = logging.getLogger(__name__)


class AveragingError(ValueError):
    """The weights of an averaging spec cannot be formed for a checkpoint; the message says why and what to change."""


def averaged_model(checkpoint: str | Path | CheckpointInfo, spec: str, *,
                   allow_missing_snapshots: bool = False) -> tuple[DiT, TrainConfig]:
    """The model (eval mode, CPU) with the weights `spec` names for `checkpoint` (a path, or one
    open_checkpoint verified), and the run's config. phema:<s> first checks that every snapshot
    due by the checkpoint's step is there."""
    kind, arg = parse_averaging(spec)
    opened = checkpoint if isinstance(checkpoint, CheckpointInfo) else open_checkpoint(checkpoint)
    cfg, step, run_dir = opened.config, opened.step, opened.run_dir
    if kind in ("ema", "raw"):
        state = read_weights(opened.path, kind)
    elif kind == "phema":
        try:  # (with none at all, posthoc_ema_state says how to get them)
            if any(snapshot_dir(run_dir).glob(SNAPSHOT_GLOB)):
                require_snapshots(run_dir, cfg, step)
        except MissingSnapshotsError as err:
            if not allow_missing_snapshots:
                raise AveragingError(f"{spec}: {err} (or set eval.allow_missing_snapshots=true)") from None
            log.warning("%s: %s; reconstructing from the snapshots present", spec, err)
        state = posthoc_ema_state(run_dir, step, float(arg))
    else:
        state = window_state(run_dir, step, int(arg))
    model = build_model(cfg, load_init=False)
    model.load_state_dict(state)
    return model.eval(), cfg


def posthoc_ema_state(run_dir: str | Path, step: int, sigma_rel: float) -> dict[str, torch.Tensor]:
    """EDM2 post-hoc EMA with `sigma_rel` at `step`, from the snapshots up to that step."""
    snapshots = read_snapshots(run_dir, step)
    if not snapshots:
        raise AveragingError(f"phema:{sigma_rel}: no post-hoc EMA snapshots at or before step {step} in "
                             f"{snapshot_dir(run_dir)}; train with phema_stds set (e.g. [0.05, 0.10]) to "
                             f"write them, or score this run with 'ema' or 'raw'")
    return reconstruct([(s, float(std_to_exp(std)), tensors) for s, std, tensors in snapshots], sigma_rel, step)


def window_state(run_dir: str | Path, step: int, k: int) -> dict[str, torch.Tensor]:
    """Uniform mean of the raw weights of the last k complete checkpoints at steps <= step."""
    window = [path for s, path in complete_checkpoints(run_dir) if s <= step][-k:]
    if len(window) < k:
        raise AveragingError(f"window:{k} at step {step} needs {k} complete checkpoints up to that step, "
                             f"{run_dir} has {len(window)}; keep more (checkpoint.keep_last / keep_every) "
                             f"or use a smaller window")
    for path in window:
        require_complete(path)
    return average_state_dicts([read_weights(path, "raw") for path in window])
