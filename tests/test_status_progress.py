"""`dtr-scale status` on a run in progress: percent done and ETA from the measured step rate,
images/s, and the newest evaluation's main metric, from the run directory's files alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtr_scale.eval.results import append_result
from dtr_scale.launch.ledger import append_record
from dtr_scale.status import format_status, run_status
from dtr_scale.train.metrics import metrics_path

SETTINGS = {"averaging": "ema", "sampler": "ddpm", "sampling_steps": 50, "cfg_scale": 1.5, "guided_channels": "all",
            "ddim_eta": 0.0, "num_samples": 500, "labels": "balanced", "seed": 0, "reference": "digits"}


@pytest.fixture
def running(tmp_path):
    """A run at step 300 of 1200 (global batch 64, 128 images/s = 2 steps/s) whose job is running."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    logged = time.time()
    lines = [{"step": step, "loss": 0.5, "images_seen": 64 * step, "images_per_s": 128.0, "total_steps": 1200,
              "time": logged - (300 - step) / 2} for step in (100, 200, 300)]
    metrics_path(run_dir).write_text("".join(json.dumps(r) + "\n" for r in lines))
    append_record(run_dir, "running", job_id="42", requeues=0, start_step=0, log="/logs/42_0_log.err")
    append_result(run_dir, {"step": 200, **SETTINGS, "digits_fd": 512.25, "class_accuracy": 0.5})
    append_result(run_dir, {"step": 100, **SETTINGS, "digits_fd": 900.0, "class_accuracy": 0.2})
    return run_dir, logged


def test_status_shows_percent_eta_and_the_last_evaluation(running):
    run_dir, logged = running
    status = run_status(run_dir, now=logged + 50)
    assert status["state"] == "running"
    assert status["progress"]["percent"] == 25.0 and status["progress"]["eta_s"] == pytest.approx(400.0)
    text = format_status(status)
    assert "progress   25.0% of 1200 steps, ETA 0:06:40 (about " in text and ", 2.00 steps/s" in text
    assert "128.0 images/s" in text
    assert "evaluated  digits_fd 512.25 at step 200 (ema)" in text  # the newest step, not the newest line


def test_status_shows_images_per_device_and_mfu_of_the_last_record(running):
    run_dir, logged = running
    with open(metrics_path(run_dir), "a") as f:
        f.write(json.dumps({"step": 400, "loss": -20.15, "mse": 0.125, "images_seen": 25600, "images_per_s": 1280.0, "total_steps": 1200,
                            "images_per_s_per_device": 640.0, "mfu": 0.4606, "time": logged}) + "\n")
    text = format_status(run_status(run_dir, now=logged))
    # the mean MSE first (comparable across runs), the ANT-UW objective labelled as such
    assert ("training   step 400, mse 0.1250, objective -20.1500, 1280.0 images/s (640.0 images/s per device, "
            "MFU 46.1%)") in text


def test_a_finished_or_failed_job_shows_no_eta(running):
    run_dir, logged = running
    append_record(run_dir, "failed", job_id="42", requeues=0, start_step=0, rank=0, error="OOM")
    text = format_status(run_status(run_dir, now=logged))
    assert "progress   25.0% of 1200 steps, 2.00 steps/s" in text and "ETA" not in text


def test_the_status_command_prints_progress(running):
    run_dir, _ = running
    out = subprocess.run([str(Path(sys.executable).parent / "dtr-scale"), "status", str(run_dir)],
                         capture_output=True, text=True, timeout=120).stdout
    eta = re.search(r"progress   25\.0% of 1200 steps, ETA 0:0(\d):(\d\d)", out)
    assert eta is not None, out
    assert 5 * 60 <= int(eta[1]) * 60 + int(eta[2]) <= 450  # 450 s at the record, minus the seconds since
    assert "evaluated  digits_fd 512.25 at step 200" in out


def test_progress_and_the_last_evaluation_are_read_without_torch():
    probe = ("import sys\nimport dtr_scale.train.progress, dtr_scale.eval.results\n"
             "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120).stdout.strip() == "False"
