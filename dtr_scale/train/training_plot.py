"""RUN_DIR/training.png: the loss, each timestep interval's loss and the learned weight of each
interval (ANT-UW, ANT-Nash) against step, with the checkpoint steps marked.

Drawn from metrics.jsonl by a child process at low CPU priority (nice 10), started at a log step
when the previous drawing has finished and started at least MIN_INTERVAL_S ago (other log steps
skip), so the training step never waits for matplotlib. `finish()` draws the final state.

    python -m dtr_scale.train.training_plot RUN_DIR     # draw it by hand, e.g. for a finished run
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dtr_scale.io import read_jsonl
from dtr_scale.plots.figure import Curve, Panel, draw_panels

TRAINING_PNG = "training.png"
PLOT_ERRORS = ".training_plot.err"  # the drawing process's stderr, for when it fails
MIN_INTERVAL_S = 30.0  # at most one drawing per this many seconds: a few seconds of CPU each
log = logging.getLogger(__name__)


def training_panels(records: list[dict[str, Any]], checkpoint_steps: list[int]) -> list[Panel]:
    """The loss; the loss of each timestep interval (0 = the lowest t); the weight of each
    interval when the run learns them (ANT-UW: 0.5 exp(-s_i); ANT-Nash: alpha_i)."""
    steps = [r["step"] for r in records]
    loss = [Curve("objective (weighted)", steps, [r["loss"] for r in records])]
    if all("unweighted_loss" in r for r in records):
        loss.append(Curve("mse + vb (unweighted)", steps, [r["unweighted_loss"] for r in records]))
    panels = [Panel("loss", loss, "loss")]
    for key, title, ylabel in (("interval_losses", "loss per timestep interval (0: the lowest t)", "mse + vb"),
                               ("uw_weights", "ANT-UW weight per interval", "0.5 exp(-s_i)"),
                               ("nash_alpha", "ANT-Nash weight per interval", "alpha_i")):
        rows = [r[key] for r in records if r.get(key)]
        if rows and len(rows) == len(records):
            table = np.asarray(rows, dtype=float)  # [records, intervals]
            curves = [Curve(f"interval {i}", steps, table[:, i]) for i in range(table.shape[1])]
            panels.append(Panel(title, curves, ylabel, log_y=bool(np.nanmin(table) > 0)))
    for panel in panels:
        panel.marks, panel.marks_label = list(checkpoint_steps), "checkpoint"
    return panels


def plot_training(metrics_file: str | Path, checkpoint_steps: list[int], out: str | Path) -> Path | None:
    """Draw `out` from the records in `metrics_file` (None while nothing is logged yet)."""
    records = read_jsonl(metrics_file)
    if not records:
        return None
    title = f"{Path(out).parent.name}: step {records[-1]['step']}"
    return draw_panels(training_panels(records, checkpoint_steps), title, out)


def metrics_path(run_dir: str | Path) -> Path:
    """RUN_DIR/metrics.jsonl, the trainer's log records (written by train.metrics, drawn here)."""
    return Path(run_dir) / "metrics.jsonl"


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """The steps of the checkpoints the run's manifest lists (none while it cannot be read: the
    picture then lacks its marks, and the trainer reports the manifest itself)."""
    from dtr_scale.train.checkpoint import CheckpointError, read_manifest  # the one reader of the layout

    try:
        return [int(entry["step"]) for entry in read_manifest(run_dir)]
    except CheckpointError:
        return []


class TrainingPlotter:
    """Keeps RUN_DIR/training.png current from a child process (see the module's docstring)."""

    def __init__(self, run_dir: str | Path, metrics_file: str | Path, min_interval_s: float = MIN_INTERVAL_S):
        self.run_dir = Path(run_dir)
        self.metrics_file = Path(metrics_file)
        self.min_interval_s = min_interval_s
        self.child: subprocess.Popen | None = None
        self.last_start = time.monotonic()  # the first drawing comes min_interval_s into the run
        self.started = 0  # drawings started
        self.skipped = 0  # log steps that found a drawing still running

    def update(self) -> bool:
        """Start a drawing unless one is still running or the last one started less than
        min_interval_s ago; True if one was started. Never waits for the drawing."""
        if self.child is not None and self.child.poll() is None:
            self.skipped += 1
            return False
        self._check_last()
        if time.monotonic() - self.last_start < self.min_interval_s:
            return False
        # the child is told where everything is, so it needs neither torch nor the checkpoint code
        steps = ",".join(map(str, checkpoint_steps(self.run_dir)))
        with open(self.run_dir / PLOT_ERRORS, "wb") as errors:
            self.child = subprocess.Popen([sys.executable, "-m", __name__, str(self.run_dir), "--metrics",
                                           str(self.metrics_file), "--checkpoints", steps],
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
        self.last_start = time.monotonic()
        self.started += 1
        return True

    def finish(self, timeout_s: float = 60.0) -> Path | None:
        """Let a running drawing end, then draw the final state in this process (so no child
        outlives the run); the picture's path, or None when there is nothing to draw."""
        if self.child is not None:
            try:
                self.child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.child.kill()  # superseded by the final drawing below
                self.child.wait()
                (self.run_dir / f".{TRAINING_PNG}.tmp-{self.child.pid}").unlink(missing_ok=True)  # its half-written one
                self.child = None
        self._check_last()
        errors = self.run_dir / PLOT_ERRORS
        if errors.is_file() and errors.stat().st_size == 0:
            errors.unlink()  # every drawing went well: nothing to keep
        try:
            return plot_training(self.metrics_file, checkpoint_steps(self.run_dir), self.run_dir / TRAINING_PNG)
        except (OSError, ValueError) as err:  # a finished run is not failed for its picture
            log.warning("could not draw %s: %s", self.run_dir / TRAINING_PNG, err)
            return None

    def _check_last(self) -> None:
        if self.child is not None and self.child.returncode:
            log.warning("drawing %s failed (exit %d); see %s", self.run_dir / TRAINING_PNG, self.child.returncode,
                        self.run_dir / PLOT_ERRORS)
        self.child = None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dtr_scale.train.training_plot",
                                     description="Draw RUN_DIR/training.png from the run's metrics.jsonl.")
    parser.add_argument("run_dir")
    parser.add_argument("--metrics", help="the metrics file (default: the run's metrics.jsonl)")
    parser.add_argument("--checkpoints", help="comma-separated checkpoint steps (default: the run's manifest)")
    args = parser.parse_args(argv)
    if args.metrics is None:
        args.metrics = metrics_path(args.run_dir)
    if args.checkpoints is None:
        steps = checkpoint_steps(args.run_dir)
    else:
        steps = [int(step) for step in args.checkpoints.split(",") if step]
    path = plot_training(args.metrics, steps, Path(args.run_dir) / TRAINING_PNG)
    print(path if path is not None else f"{args.metrics} has no logged step yet")


if __name__ == "__main__":
    os.nice(10)  # the trainer's processes come first on a shared CPU
    main()
