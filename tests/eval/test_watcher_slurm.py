"""Submit mode on the real local SLURM: the watcher sends one evaluation job per due checkpoint
with sbatch, and the results come back from the cluster."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from dtr_scale.config import ClusterConfig
from dtr_scale.eval.results import read_results
from dtr_scale.eval.watcher import watch
from dtr_scale.eval.work_log import work_path

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
