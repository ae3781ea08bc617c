"""The same job through submitit's local executor: no SLURM, same stop/requeue path."""

from __future__ import annotations

import os
import signal

import pytest
import submitit

from dtr_scale.config import ClusterConfig
from dtr_scale.launch.ledger import read_status
from dtr_scale.launch.submit import submit_training
from launch_helpers import ledger_states, local_task_pids, results_within, wait_until
from stand_in_trainer import StandInConfig, expected_state, logged_steps, read_checkpoint, train

STEPS = 20


def local_cluster() -> ClusterConfig:
    return ClusterConfig(kind="local", tasks_per_node=2, time_min=60, signal_delay_s=30)


def test_local_job_preempted_resumes_without_training_a_step_twice(tmp_path):
    cfg = StandInConfig(run_dir=str(tmp_path / "run"), steps=STEPS)
    job = submit_training(cfg, local_cluster(), train_fn=train)
    wait_until(lambda: len(logged_steps(cfg.run_dir, 0)) >= 5, 60, "5 steps")
    for pid in local_task_pids(job):  # what SLURM's preemption does to each task
        os.kill(pid, signal.SIGUSR2)
    results = results_within(job, 90)
    assert [(r.status, r.step) for r in results] == [("finished", STEPS)] * 2
    for rank in (0, 1):
        assert logged_steps(cfg.run_dir, rank) == list(range(1, STEPS + 1))
    assert read_checkpoint(cfg.run_dir) == {"step": STEPS, "state": expected_state(STEPS, world_size=2)}
    assert ledger_states(cfg.run_dir) == ["running", "requeued", "running", "finished"]
    assert read_status(cfg.run_dir)["requeues"] == 1


def test_local_failing_job_reports_its_error(tmp_path):
    cfg = StandInConfig(run_dir=str(tmp_path / "run"), steps=STEPS, fail_at_step=3)
    job = submit_training(cfg, local_cluster(), train_fn=train)
    with pytest.raises(submitit.core.utils.FailedJobError, match="failed on purpose at step 3"):
        results_within(job, 60)
    status = read_status(cfg.run_dir)
    assert (status["state"], status["error"]) == ("failed", "RuntimeError: stand-in trainer failed on purpose at step 3")
    assert ledger_states(cfg.run_dir).count("running") == 1


def test_time_limit_stop_past_the_requeue_budget_fails_visibly(tmp_path):
    # Under a 10-minute limit submitit counts every signal as the time limit's.
    cfg = StandInConfig(run_dir=str(tmp_path / "run"), steps=STEPS)
    cluster = ClusterConfig(kind="local", tasks_per_node=2, time_min=5, signal_delay_s=30, max_requeues=0)
    job = submit_training(cfg, cluster, train_fn=train)
    wait_until(lambda: len(logged_steps(cfg.run_dir, 0)) >= 3, 60, "3 steps")
    for pid in local_task_pids(job):
        os.kill(pid, signal.SIGUSR2)
    with pytest.raises(submitit.core.utils.FailedJobError, match="timed-out too many times"):
        results_within(job, 60)
    status = read_status(cfg.run_dir)
    assert status["state"] == "failed" and "raise cluster.max_requeues" in status["error"]
    assert read_checkpoint(cfg.run_dir)["step"] == status["step"] >= 3  # the stop's checkpoint is complete
