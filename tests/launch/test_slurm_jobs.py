"""End to end on a real single-node SLURM: 2-task gloo jobs of the stand-in
trainer, submitted through submitit, preempted and failing (the real trainer
through a real time limit: test_training_jobs.py, test_two_nodes.py)."""

from __future__ import annotations

import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
import submitit

from dtr_scale.config import ClusterConfig
from dtr_scale.io import append_jsonl
from dtr_scale.launch.follow import SLURM_ACTIVE_STATES, job_over, slurm_state
from dtr_scale.launch.ledger import ledger_path, read_status
from dtr_scale.launch.submit import submit_training
from launch_helpers import ledger_states, preempt_paused, results_within, sacct_states, wait_until
from stand_in_trainer import StandInConfig, expected_state, logged_steps, read_checkpoint, train

pytestmark = pytest.mark.usefixtures("slurm_cluster")

STEPS = 20


def debug_cluster(**overrides) -> ClusterConfig:
    # A long limit: submitit calls any signal past min(0.8 x limit, limit - 10 min) a time-out.
    fields = dict(kind="slurm", partition="debug", tasks_per_node=2, cpus_per_task=1, time_min=60,
                  signal_delay_s=30)
    return ClusterConfig(**(fields | overrides))


def assert_trained_once_to(run_dir, steps: int) -> None:
    """Every rank trained steps 1..steps exactly once, to the uninterrupted run's state."""
    for rank in (0, 1):
        assert logged_steps(run_dir, rank) == list(range(1, steps + 1))
    assert read_checkpoint(run_dir) == {"step": steps, "state": expected_state(steps, world_size=2)}


def test_two_task_job_trains_to_the_last_step(tmp_path):
    cfg = StandInConfig(run_dir=str(tmp_path / "run"), steps=STEPS)
    job = submit_training(cfg, debug_cluster(), train_fn=train)
    results = results_within(job, 90)
    assert [(r.status, r.step) for r in results] == [("finished", STEPS)] * 2
    assert_trained_once_to(cfg.run_dir, STEPS)
    assert ledger_states(cfg.run_dir) == ["running", "finished"]


def test_preempted_twice_resumes_without_training_a_step_twice(tmp_path):
    cfg = StandInConfig(run_dir=str(tmp_path / "run"), steps=STEPS)
    job = submit_training(cfg, debug_cluster(), train_fn=train)

    # 1: the preemption signal itself, as SLURM sends it.
    wait_until(lambda: len(logged_steps(cfg.run_dir, 0)) >= 5, 60, "5 steps")
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    wait_until(lambda: ledger_states(cfg.run_dir).count("running") == 2, 60, "the requeued job to start")

    # 2: a job in the higher-priority partition needs the whole node.
    wait_until(lambda: len(logged_steps(cfg.run_dir, 0)) >= 10, 60, "10 steps")
    urgent = []
    preempt_paused(job.job_id, lambda: urgent.append(subprocess.run(
        ["sbatch", "--parsable", "--partition=urgent", "--exclusive", "--output=/dev/null", "--wrap=sleep 1"],
        check=True, capture_output=True, text=True).stdout.strip()))

    results = results_within(job, 120, cfg.run_dir)
    assert [(r.status, r.step) for r in results] == [("finished", STEPS)] * 2
    assert_trained_once_to(cfg.run_dir, STEPS)
    status = read_status(cfg.run_dir)
    requeued = [r for r in status["jobs"] if r["state"] == "requeued"]
    assert [r["reason"] for r in requeued] == ["preempted", "preempted"]
    assert 5 <= requeued[0]["end_step"] < requeued[1]["end_step"] < STEPS
    assert (status["state"], status["step"], status["requeues"]) == ("finished", STEPS, 2)
    wait_until(lambda: sacct_states(urgent[0]) == ["COMPLETED"], 30, "the urgent job to complete")
    wait_until(lambda: sacct_states(job.job_id)[-1] == "COMPLETED", 30, "sacct to show the job COMPLETED")
    runs = sacct_states(job.job_id)
    assert len(runs) == 3 and set(runs[:2]) <= {"REQUEUED", "PREEMPTED"}


def test_a_terminal_reading_between_runs_does_not_end_the_job(tmp_path, monkeypatch):
    # submitit caches one accounting reading, and a job that requeues itself can read COMPLETED
    # between its runs: job_over believes a terminal reading only when slurmctld agrees and the
    # ledger did not just say "requeued".
    cfg = StandInConfig(run_dir=str(tmp_path / "run"), steps=100_000)
    job = submit_training(cfg, debug_cluster(), train_fn=train)
    wait_until(lambda: ledger_states(cfg.run_dir) == ["running"], 60, "the job to start")
    monkeypatch.setattr(job, "done", lambda force_check=False: True)  # the cached terminal reading
    assert slurm_state(job.job_id) == "RUNNING" and not job_over(job, cfg.run_dir)

    subprocess.run(["scancel", job.job_id], check=True)
    wait_until(lambda: slurm_state(job.job_id) not in SLURM_ACTIVE_STATES, 60, "the job to be cancelled")
    assert slurm_state(job.job_id) == "CANCELLED" and job_over(job, cfg.run_dir)
    for age_s, over in ((5, False), (600, True)):  # a requeue just written, and one that never came
        run_dir = tmp_path / f"requeued_{age_s}s_ago"
        written = datetime.now(timezone.utc) - timedelta(seconds=age_s)
        append_jsonl(ledger_path(run_dir), {"time": written.isoformat(timespec="seconds"), "state": "requeued"})
        assert job_over(job, run_dir) is over


def test_failing_job_is_not_requeued_and_reports_its_error(tmp_path):
    cfg = StandInConfig(run_dir=str(tmp_path / "run"), steps=STEPS, fail_at_step=5)
    job = submit_training(cfg, debug_cluster(), train_fn=train)
    with pytest.raises(submitit.core.utils.FailedJobError, match="failed on purpose at step 5"):
        results_within(job, 90)
    status = read_status(cfg.run_dir)
    assert status["state"] == "failed"
    assert status["error"] == "RuntimeError: stand-in trainer failed on purpose at step 5"
    assert status["log"].endswith(f"{job.job_id}_0_log.err")
    assert ledger_states(cfg.run_dir).count("running") == 1
    wait_until(lambda: sacct_states(job.job_id) == ["FAILED"], 30, "sacct to show the job FAILED")
    time.sleep(2)  # a requeue would show as a second run
    assert sacct_states(job.job_id) == ["FAILED"]
