"""logging.tensorboard=true: TensorBoard events in RUN_DIR/tensorboard holding the metrics JSONL's scalars
at its steps; without the package, an error naming the extra before anything starts."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from dtr_scale.extras import MissingExtraError
from dtr_scale.preflight import extras_problems
from dtr_scale.train.loop import train
from dtr_scale.train.metrics import flat_scalars, open_tensorboard, read_metrics


def read_events(directory) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) events, as TensorBoard reads them back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_the_events_hold_the_metrics_lines_scalars(tiny_config):
    cfg = tiny_config(steps=4, **{"logging.every": 2, "logging.tensorboard": True, "checkpoint.every": 4})
    train(cfg)
    records = read_metrics(cfg.run_dir)
    assert [r["step"] for r in records] == [2, 4]

    events = read_events(f"{cfg.run_dir}/tensorboard")
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for tag, value in flat_scalars(record).items():
            if tag not in ("step", "time") and value is not None:
                expected.setdefault(tag, []).append((record["step"], float(np.float32(value))))
    assert events == expected  # float32: TensorBoard's simple_value
    for tag in ("loss", "mse", "vb", "grad_norm", "lr", "images_per_s", "interval_losses/3", "uw_weights/0"):
        assert tag in events
    assert events["lr"] == [(2, float(np.float32(1e-3))), (4, float(np.float32(1e-3)))]


def test_without_tensorboard_the_extra_is_named(tiny_config, monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    problems = extras_problems(tiny_config(**{"logging.tensorboard": True}))
    assert any("pip install 'dtr-scale[tensorboard]'" in p and "logging.tensorboard=true" in p for p in problems)
    assert not extras_problems(tiny_config())

    monkeypatch.setitem(__import__("sys").modules, "tensorboard", None)  # import fails as if not installed
    with pytest.raises(MissingExtraError, match=r"dtr-scale\[tensorboard\]"):
        open_tensorboard(tmp_path, 0)


def test_evaluation_results_go_to_their_own_run_beside_training(tiny_config, tmp_path):
    from dtr_scale.eval.results import log_to_tensorboard

    records = [{"step": 200, "averaging": "ema", "fid": 12.5, "precision": 0.625, "gpu_hours": 1.5},
               {"step": 400, "averaging": "ema", "fid": 9.25, "protocol": "quick"}]
    log_to_tensorboard(tmp_path, tiny_config(), records)
    assert not (tmp_path / "tensorboard").exists()  # logging.tensorboard is off by default

    log_to_tensorboard(tmp_path, tiny_config(**{"logging.tensorboard": True}), records)
    assert read_events(tmp_path / "tensorboard" / "eval") == {
        "eval/ema/fid": [(200, 12.5)], "eval/ema/precision": [(200, 0.625)], "train_gpu_hours": [(200, 1.5)],
        "eval_quick/ema/fid": [(400, 9.25)]}
