"""Percent done and ETA from a metrics record: the measured step rate, counted from now."""

from __future__ import annotations

import pytest

from dtr_scale.train.progress import eta_seconds, format_duration, progress, progress_text, steps_per_second

# step 300 of 1200 at global batch 64: 19200 images seen, 128 images/s is 2 steps/s
RECORD = {"step": 300, "images_seen": 19200, "images_per_s": 128.0, "total_steps": 1200, "time": 1_000_000.0}


def test_the_step_rate_is_images_per_second_over_the_batch():
    assert steps_per_second(RECORD) == 2.0
    assert steps_per_second({"step": 0, "images_seen": 0, "images_per_s": 0.0}) is None


def test_eta_is_the_steps_left_at_the_measured_rate():
    assert eta_seconds(300, 1200, 2.0) == 450.0
    assert eta_seconds(1200, 1200, None) == 0.0 and eta_seconds(10, 1200, None) is None


def test_progress_counts_the_eta_from_now():
    info = progress(RECORD)
    assert (info["percent"], info["eta_s"], info["finish_time"]) == (25.0, 450.0, 1_000_450.0)
    later = progress(RECORD, now=1_000_100.0)  # 100 s after the record: 350 s left
    assert later["eta_s"] == 350.0 and progress(RECORD, now=2_000_000.0)["eta_s"] == 0.0
    assert progress_text(later) == "25.0% of 1200 steps, ETA 0:05:50"
    assert progress({"step": 3}) is None  # a record of an older version: no total, no progress


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (59.2, "0:01:00"), (3725, "1:02:05"),
                                           (2 * 86400 + 3 * 3600 + 4 * 60 + 5, "2d 03:04:05")])
def test_durations_read_as_clock_time(seconds, text):
    assert format_duration(seconds) == text


def test_each_log_line_ends_with_percent_done_and_eta(tmp_path, caplog):
    import json
    import logging

    from dtr_scale.config import to_train_config
    from dtr_scale.train.metrics import MetricsLogger, metrics_path

    metrics = MetricsLogger(tmp_path, to_train_config({"steps": 1200, "logging": {"wandb": "disabled"}}), enabled=True)
    with caplog.at_level(logging.INFO, logger="dtr_scale.train.metrics"):
        metrics.write({"step": 300, "loss": 0.5, "grad_norm": 1.0, "images_per_s": 128.0, "images_seen": 19200,
                       "time_data_ms": 1.0, "time_forward_backward_ms": 400.0, "time_optimizer_ms": 99.0})
    metrics.close()
    assert caplog.records[-1].getMessage().endswith("128.0 img/s  data 1 ms  fwd+bwd 400 ms  opt 99 ms  "
                                                    "25.0% of 1200 steps, ETA 0:07:30")
    (logged,) = [json.loads(line) for line in metrics_path(tmp_path).read_text().splitlines()]
    assert logged["total_steps"] == 1200 and logged["time"] > 1.7e9  # what status computes its ETA from


def test_the_log_line_names_images_per_device_and_mfu(tmp_path, caplog):
    import logging

    from dtr_scale.config import to_train_config
    from dtr_scale.train.metrics import MetricsLogger

    metrics = MetricsLogger(tmp_path, to_train_config({"steps": 1200, "logging": {"wandb": "disabled"}}), enabled=True)
    with caplog.at_level(logging.INFO, logger="dtr_scale.train.metrics"):
        metrics.write({"step": 300, "loss": 0.5, "grad_norm": 1.0, "images_per_s": 1280.0, "images_seen": 192000,
                       "images_per_s_per_device": 640.0, "mfu": 0.4606,
                       "time_data_ms": 1.0, "time_forward_backward_ms": 400.0, "time_optimizer_ms": 99.0})
    metrics.close()
    assert "1280.0 img/s (640.0 images/s per device, MFU 46.1%)  data 1 ms" in caplog.records[-1].getMessage()


def test_throughput_text_names_images_per_device_and_mfu_where_known():
    from dtr_scale.train.progress import throughput_text

    assert throughput_text({"images_per_s_per_device": 412.04, "mfu": 0.41349}) == "412.0 images/s per device, MFU 41.3%"
    assert throughput_text({"images_per_s_per_device": 98.0, "mfu": None}) == "98.0 images/s per device"
    assert throughput_text({"images_per_s": 98.0}) == ""  # a record from before these were logged


def test_the_losses_people_read_are_the_mean_mse_then_the_objective():
    from dtr_scale.train.progress import loss_fields, loss_text

    record = {"loss": -20.15, "mse": 0.125}  # ANT-UW at a few hundred steps: the objective is negative
    assert loss_fields(record) == {"mse": "0.1250", "objective": "-20.1500"}
    assert loss_text(record) == "mse 0.1250, objective -20.1500"
    assert loss_text(record, "  ") == "mse 0.1250  objective -20.1500"
    assert loss_text({"loss": 0.5}) == "objective 0.5000"  # a record without the mean MSE


def test_an_ant_uw_run_shows_the_logged_mse_in_its_bar_and_log_lines(tiny_config, monkeypatch, caplog):
    import io
    import logging

    from tqdm.auto import tqdm

    from dtr_scale.train import loop
    from dtr_scale.train.metrics import read_metrics

    shown = io.StringIO()

    def visible_bar(*args, **kwargs):  # the bar as a terminal would show it (tests run without one)
        return tqdm(*args, **{**kwargs, "disable": False, "file": shown})

    monkeypatch.setattr(loop, "tqdm", visible_bar)
    cfg = tiny_config(steps=4, phema_stds=[], **{"logging.every": 2, "checkpoint.every": 4})
    assert cfg.weighting.kind == "ant_uw"
    with caplog.at_level(logging.INFO, logger="dtr_scale.train.metrics"):
        loop.train(cfg)
    records = read_metrics(cfg.run_dir)
    assert [r["step"] for r in records] == [2, 4]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    for record, line in zip(records, lines, strict=True):
        assert record["mse"] != record["loss"]  # the objective is the uncertainty-weighted sum, not the MSE
        assert line.startswith(f"step {record['step']}  mse {record['mse']:.4f}  objective {record['loss']:.4f}  grad ")
    last = records[-1]
    assert f"mse={last['mse']:.4f}, objective={last['loss']:.4f}" in shown.getvalue()
    assert "loss=" not in shown.getvalue()


def test_the_bar_of_a_followed_job_shows_the_mse_and_the_objective(tmp_path):
    import io
    import json

    from tqdm.auto import tqdm

    from dtr_scale.launch.follow import _progress
    from dtr_scale.train.metrics import metrics_path

    metrics_path(tmp_path).write_text(json.dumps({"step": 300, "loss": -20.15, "mse": 0.125, "images_per_s": 128.0,
                                                  "images_seen": 19200, "total_steps": 1200}) + "\n")
    shown = io.StringIO()
    with tqdm(total=1200, file=shown, disable=False) as bar:
        _progress(tmp_path, bar)
        bar.refresh()
    assert "300/1200" in shown.getvalue() and "mse=0.1250, objective=-20.1500, img_s=128" in shown.getvalue()
