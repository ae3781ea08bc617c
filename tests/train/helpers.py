"""Short runs that checkpoint every EVERY steps, and what a test reads back from one, shared by the
crash-safety and full-disk tests (a test module never imports another)."""

from __future__ import annotations

from pathlib import Path

import torch

from dtr_scale.eval.sample import load_model
from dtr_scale.train.checkpoint import latest_checkpoint
from dtr_scale.train.metrics import read_metrics

EVERY, STEPS = 2, 6


def crash_config(tiny_config, run_dir: Path, steps: int = STEPS, **overrides):
    # no post-hoc EMA: its snapshots are not DCP's to write, and they cost time here
    return tiny_config(run_dir=str(run_dir), steps=steps, phema_stds=[],
                       **{"checkpoint.every": EVERY, "logging.every": 1, **overrides})


def final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    """Model and EMA weights of the run's latest checkpoint, read as the evaluator reads them."""
    path = latest_checkpoint(run_dir)
    return {f"{which}.{name}": value for which in ("model", "ema")
            for name, value in load_model(path, use_ema=which == "ema")[0].state_dict().items()}


def logged_losses(run_dir: str) -> list[tuple[int, float]]:
    """(step, loss) of every metrics record, the killed run's and then the resumed run's."""
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]
