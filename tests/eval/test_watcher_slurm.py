"""Submit mode on the real local SLURM: the watcher sends one evaluation job per due checkpoint
with sbatch, and the results come back from the cluster; a submitted job holds its checkpoint
through a requeue."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import submitit

from dtr_scale.config import ClusterConfig
from dtr_scale.eval.results import read_results
from dtr_scale.eval.watcher import watch
from dtr_scale.eval.work_log import job_alive, work_path
from dtr_scale.launch.follow import slurm_state

SMALL = {"eval.num_samples": 20, "eval.batch_size": 10, "diffusion.sampling_steps": 5}


@pytest.mark.usefixtures("slurm_cluster")
def test_submit_mode_evaluates_on_slurm(run_copy, eval_config):
    cfg = eval_config(run_copy, **SMALL, **{"eval.every": 100, "eval.averaging": ["ema"]})
    cluster = ClusterConfig(kind="slurm", partition="debug", tasks_per_node=1, cpus_per_task=1, time_min=10,
                            signal_delay_s=30)
    assert watch(run_copy, cfg, mode="submit", cluster=cluster, wait_for_jobs=True, poll_s=1, max_wait_s=300) == []
    assert sorted(r["step"] for r in read_results(run_copy)) == [100, 200, 250]  # due ones, and the last
    events = [json.loads(line) for line in work_path(run_copy).read_text().splitlines()]
    assert [(e["event"], e["cluster"]) for e in events] == [("submitted", "slurm")] * 3
    jobs = ",".join(e["job_id"] for e in events)
    deadline = time.monotonic() + 60  # a job's result is written a moment before SLURM calls it done
    while (states := sacct_states(jobs)) != ["COMPLETED"] * 3 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert states == ["COMPLETED"] * 3


def sacct_states(jobs: str) -> list[str]:
    return subprocess.run(["sacct", "-n", "-P", "-X", "-j", jobs, "-o", "State"], check=True, capture_output=True,
                          text=True).stdout.split()


@pytest.mark.usefixtures("slurm_cluster")
def test_a_submitted_evaluation_job_is_alive_through_a_requeue_and_not_after_it_ended(tmp_path, monkeypatch):
    # Its checkpoint is not handed to another evaluator while SLURM holds the job, requeued or not,
    # even when the accounting reads COMPLETED (as it can for a moment between two runs).
    monkeypatch.setattr(submitit.SlurmJob, "state", property(lambda job: "COMPLETED"))
    job_id = subprocess.run(["sbatch", "--parsable", "--partition=debug", "--output=/dev/null", "--wrap=sleep 300"],
                            check=True, capture_output=True, text=True).stdout.strip()
    event = {"cluster": "slurm", "job_id": job_id, "folder": str(tmp_path)}
    try:
        wait_until_state(job_id, {"RUNNING"})
        assert job_alive(event)
        subprocess.run(["scontrol", "requeue", job_id], check=True)
        wait_until_state(job_id, {"PENDING", "REQUEUED"})
        assert job_alive(event)
    finally:
        subprocess.run(["scancel", job_id], check=True)
    wait_until_state(job_id, {"CANCELLED"})
    assert not job_alive(event)


def wait_until_state(job_id: str, states: set[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while (state := slurm_state(job_id)) not in states:
        assert time.monotonic() < deadline, f"job {job_id} is {state}, not {sorted(states)}, after {timeout_s:.0f} s"
        time.sleep(0.2)
