"""training.png: the loss, the per-interval losses and the ANT-UW weights against step with the
checkpoints marked, kept current by a child process that the training step never waits for."""

from __future__ import annotations

import json
import time

import numpy as np
from PIL import Image

from dtr_scale.train.loop import train
from dtr_scale.train.metrics import metrics_path
from dtr_scale.train.training_plot import PLOT_ERRORS, TRAINING_PNG, TrainingPlotter, plot_training, training_panels

RECORDS = [{"step": s, "loss": 1.0 / s, "unweighted_loss": 2.0 / s, "interval_losses": [0.1 * s, 0.2, 0.3],
            "uw_weights": [0.5, 0.5 + s / 100, 0.4]} for s in (10, 20, 30)]


def test_the_panels_are_the_logged_numbers_with_checkpoints_marked():
    loss, intervals, weights = training_panels(RECORDS, [20, 30])
    assert [c.label for c in loss.curves] == ["objective (weighted)", "mse + vb (unweighted)"]
    assert list(loss.curves[1].values) == [0.2, 0.1, 2.0 / 30]
    assert [c.label for c in intervals.curves] == ["interval 0", "interval 1", "interval 2"]
    assert np.allclose(intervals.curves[0].values, [1.0, 2.0, 3.0]) and intervals.log_y
    assert weights.title == "ANT-UW weight per interval" and np.allclose(weights.curves[1].values, [0.6, 0.7, 0.8])
    assert all(p.marks == [20, 30] and list(p.curves[0].steps) == [10, 20, 30] for p in (loss, intervals, weights))


def test_a_run_without_learned_weights_draws_two_panels():
    records = [{k: v for k, v in r.items() if k != "uw_weights"} for r in RECORDS]
    assert [p.title for p in training_panels(records, [])] == ["loss", "loss per timestep interval (0: the lowest t)"]


def test_the_picture_is_drawn_from_metrics_jsonl(tmp_path):
    assert plot_training(metrics_path(tmp_path), [], tmp_path / TRAINING_PNG) is None  # nothing logged yet
    metrics_path(tmp_path).write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    path = plot_training(metrics_path(tmp_path), [20], tmp_path / TRAINING_PNG)
    assert path == tmp_path / TRAINING_PNG
    assert Image.open(path).size == (1350, 320)  # three panels of 450 x 320 pixels


def test_training_writes_both_pictures_and_a_log_step_never_waits_for_a_drawing(tiny_config, monkeypatch):
    cfg = tiny_config(steps=20)
    waits = []
    update = TrainingPlotter.update

    def timed(self):
        start = time.perf_counter()
        started = update(self)
        waits.append((time.perf_counter() - start, started))
        return started

    monkeypatch.setattr(TrainingPlotter, "update", timed)
    train(cfg)
    run_dir = metrics_path(cfg.run_dir).parent
    assert Image.open(run_dir / TRAINING_PNG).size == (1350, 320)
    assert Image.open(run_dir / "routing.png").size[0] > 768  # DTR with 64 channels: 12 pixels per channel
    assert len(waits) == 4  # each of the 4 log steps (the drawings are at most one per 30 s; the last one at the end)
    assert max(seconds for seconds, _ in waits) < 0.5  # a log step does not wait for a drawing


def test_a_log_step_that_finds_a_drawing_running_skips(tmp_path):
    metrics_path(tmp_path).write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    plotter = TrainingPlotter(tmp_path, metrics_path(tmp_path), min_interval_s=0.0)
    assert plotter.update() and not plotter.update()  # the first one is still starting up
    assert (plotter.started, plotter.skipped) == (1, 1)
    assert (tmp_path / PLOT_ERRORS).is_file()  # the running drawing's stderr
    assert plotter.finish() == tmp_path / TRAINING_PNG and plotter.child is None  # waited for, nothing left behind
    assert not (tmp_path / PLOT_ERRORS).exists()  # the drawings said nothing: no empty file stays
    assert not TrainingPlotter(tmp_path, metrics_path(tmp_path), min_interval_s=60.0).update()  # too soon


def test_both_pictures_are_logged_to_wandb_when_it_is_on(tmp_path):
    from dtr_scale.config import to_train_config
    from dtr_scale.models.routing import dtr_mask
    from dtr_scale.plots.routing import write_routing_png
    from dtr_scale.train.metrics import MetricsLogger

    cfg = to_train_config({"run_dir": str(tmp_path), "steps": 10, "logging": {"wandb": "offline"}})
    metrics = MetricsLogger(tmp_path, cfg, enabled=True)
    metrics.image("routing", write_routing_png(tmp_path / "routing.png", dtr_mask(32, 100).numpy()[None] > 0,
                                               "dtr", 0.8, 4.0))
    metrics.write({"step": 10, "loss": 0.5, "grad_norm": 1.0, "images_per_s": 10.0, "images_seen": 640,
                   "time_data_ms": 1.0, "time_forward_backward_ms": 1.0, "time_optimizer_ms": 1.0})
    metrics.close()
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    logged = sorted(p.name.split("_")[0] for p in (run / "files" / "media" / "images").glob("*.png"))
    assert logged == ["routing", "training"]
    assert (tmp_path / TRAINING_PNG).exists()
