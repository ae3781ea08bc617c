"""Time to FID: what training had spent at a checkpoint, across a crash, a resume and a change
of world size, from the job ledger and the logged step times."""

import json
from datetime import datetime, timezone

import pytest

from dtr_scale.eval.training_cost import training_cost
from dtr_scale.launch.ledger import LEDGER_NAME
from dtr_scale.train.metrics import metrics_path

BATCH = 64


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")


def log_record(t: float, step: int, world_size: int) -> dict:
    # 100 images/s per device: the record's interval took (its steps x 64) / (100 x world size) s
    return {"time": t, "step": step, "images_seen": step * BATCH, "images_per_s": 100.0 * world_size,
            "images_per_s_per_device": 100.0, "loss": 1.0}


def write_run(run_dir, ledger, metrics):
    run_dir.mkdir(exist_ok=True)
    (run_dir / LEDGER_NAME).write_text("".join(json.dumps(r) + "\n" for r in ledger))
    metrics_path(run_dir).write_text("".join(json.dumps(r) + "\n" for r in metrics))


@pytest.fixture
def crashed_and_resumed(tmp_path):
    """Job 1 (8 GPUs) starts at t=1000, logs steps 100 and 200 (checkpoint 200), trains on to 300
    and crashes at t=1350; its log past step 200 was dropped by the resume. Job 2 (4 GPUs)
    resumes from 200 at t=2000 (after waiting in the queue), logs 250, 300, 400, ends at 2310."""
    ledger = [
        {"time": iso(1000), "state": "running", "job_id": "1", "requeues": 0, "start_step": 0},
        {"time": iso(1350), "state": "failed", "job_id": "1", "requeues": 0, "start_step": 0, "rank": 3},
        {"time": iso(2000), "state": "running", "job_id": "2", "requeues": 0, "start_step": 200},
        {"time": iso(2310), "state": "finished", "job_id": "2", "requeues": 0, "start_step": 200, "end_step": 400},
    ]
    metrics = [log_record(1100, 100, 8), log_record(1200, 200, 8),
               log_record(2100, 250, 4), log_record(2200, 300, 4), log_record(2300, 400, 4)]
    write_run(tmp_path / "run", ledger, metrics)
    return tmp_path / "run"


def test_a_checkpoint_of_the_first_job_costs_its_time_up_to_that_step(crashed_and_resumed):
    cost = training_cost(crashed_and_resumed, 200)
    assert (cost.wall_s, cost.gpu_hours) == pytest.approx((200.0, 200.0 * 8 / 3600))


def test_the_crashed_job_counts_whole_and_the_queue_wait_not_at_all(crashed_and_resumed):
    cost = training_cost(crashed_and_resumed, 300)  # job 1: 350 s on 8 GPUs; job 2: 200 s on 4
    assert (cost.wall_s, cost.gpu_hours) == pytest.approx((550.0, (350 * 8 + 200 * 4) / 3600))
    between = training_cost(crashed_and_resumed, 350)  # halfway from the record at 300 to the one at 400
    assert (between.wall_s, between.gpu_hours) == pytest.approx((600.0, (350 * 8 + 250 * 4) / 3600))


def test_a_step_the_logs_do_not_reach_has_no_cost(crashed_and_resumed):
    assert training_cost(crashed_and_resumed, 500) is None


def test_without_a_ledger_the_logged_step_times_add_up(tmp_path):
    # 100 steps of 64 images at 200 images/s (2 devices) = 32 s, then 100 at 400 images/s (4) = 16 s
    records = [log_record(0, 100, 2), log_record(0, 200, 4)]
    (tmp_path / "run").mkdir()
    metrics_path(tmp_path / "run").write_text("".join(json.dumps(r) + "\n" for r in records))
    cost = training_cost(tmp_path / "run", 200)
    assert (cost.wall_s, cost.gpu_hours) == pytest.approx((48.0, (32 * 2 + 16 * 4) / 3600))
    half = training_cost(tmp_path / "run", 150)
    assert (half.wall_s, half.gpu_hours) == pytest.approx((40.0, (32 * 2 + 8 * 4) / 3600))
