"""`dtr-scale status RUN_DIR`: what a run's directory says about its jobs, checkpoint, speed and
provenance, read without importing torch (people poll it from login nodes)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from dtr_scale.config import to_train_config
from dtr_scale.launch.ledger import append_record
from dtr_scale.status import format_status, run_status
from dtr_scale.provenance import collect_provenance, read_provenance
from dtr_scale.train.loop import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("status") / "run"
    train(to_train_config({
        "model": {"name": "DiT-S/2", "input_size": 8, "in_channels": 4, "num_classes": 4, "depth": 1,
                  "hidden_size": 32, "num_heads": 2},
        "data": {"kind": "synthetic", "num_samples": 64}, "run_dir": str(run_dir), "steps": 6,
        "global_batch_size": 8, "weighting": {"num_intervals": 4}, "checkpoint": {"every": 4},
        "logging": {"every": 3, "wandb": "disabled"}, "sample_at_end": 0,
    }))
    return run_dir  # train() wrote its provenance at the start


def test_a_run_trained_in_process_shows_its_checkpoint_and_speed(trained_run):
    status = run_status(trained_run)
    assert status["state"] == "not launched (trained in-process)" and status["jobs"] == []
    assert status["checkpoint_step"] == 6 and status["checkpoint"].endswith("step_00000006")
    assert status["last_logged"]["step"] == 6 and status["last_logged"]["images_seen"] == 48
    text = format_status(status)
    assert "(step 6)" in text and "48 images seen" in text


def test_a_failed_job_shows_its_error_log_and_requeues(trained_run, tmp_path):
    trained_run = shutil.copytree(trained_run, tmp_path / "run")  # the other tests see the run as trained
    append_record(trained_run, "running", job_id="77", requeues=0, start_step=0, log="/logs/77_0_log.err")
    append_record(trained_run, "requeued", job_id="77", requeues=0, start_step=0, end_step=4, reason="preempted")
    append_record(trained_run, "running", job_id="77", requeues=1, start_step=4, log="/logs/77_0_log.err")
    append_record(trained_run, "failed", job_id="77", requeues=1, start_step=4, rank=0,
                  error="RuntimeError: loss is NaN at step 5", log="/logs/77_0_log.err")
    status = run_status(trained_run)
    assert (status["state"], status["job_id"], status["requeues"]) == ("failed", "77", 1)
    text = format_status(status, results="| step | digits_fd |")
    assert "error      RuntimeError: loss is NaN at step 5" in text
    assert "log        /logs/77_0_log.err" in text
    assert "requeued  start_step=0 end_step=4 reason=preempted" in text
    assert text.endswith("evaluation:\n| step | digits_fd |")


def test_a_missing_run_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run directory at .*nowhere"):
        run_status(tmp_path / "nowhere")


def test_the_last_logged_record_is_read_from_the_end_of_a_long_log(tmp_path):
    import json

    from dtr_scale.train.metrics import last_logged, metrics_path

    lines = [json.dumps({"step": step, "loss": 1.0 / step}) for step in range(1, 5001)]
    metrics_path(tmp_path).write_text("\n".join(lines) + "\n" + '{"step": 5001, "lo')  # a torn last line
    assert last_logged(tmp_path, tail_bytes=200) == {"step": 5000, "loss": 1.0 / 5000}
    assert last_logged(tmp_path / "none") is None


def test_the_provenance_names_the_code_the_software_and_the_hardware(trained_run):
    import platform

    import torch

    (record,) = read_provenance(trained_run)  # one start, one line
    assert record == json.loads(json.dumps({**collect_provenance(), "time": record["time"], "argv": sys.argv}))
    assert record["packages"]["torch"] == torch.__version__.split("+")[0] and record["python"] == platform.python_version()
    assert record["hardware"]["gpu_count"] == torch.cuda.device_count()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert record["git"]["commit"] == commit and isinstance(record["git"]["dirty"], bool)  # tests run in the checkout


STATUS_WITHOUT_TORCH = """
import sys
sys.argv = ["dtr-scale", "status", sys.argv[1]]
from dtr_scale.cli import main
try:
    main()
finally:
    print("torch imported:", "torch" in sys.modules)
"""


def test_status_of_a_finished_run_imports_no_torch_and_prints_the_provenance(trained_run):
    done = subprocess.run([sys.executable, "-c", STATUS_WITHOUT_TORCH, str(trained_run)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "torch imported: False" in done.stdout
    commit = read_provenance(trained_run)[-1]["git"]["commit"]
    assert "code       dtr-scale " in done.stdout and f"commit {commit[:12]}" in done.stdout
    assert "checkpoint " in done.stdout and "(step 6)" in done.stdout
