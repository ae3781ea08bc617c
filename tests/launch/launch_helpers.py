"""Helpers of the launch tests: cluster presets as composed, and waiting on and poking at real jobs."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import submitit
from omegaconf import OmegaConf

from dtr_scale.config import ClusterConfig
from dtr_scale.configs import CONFIG_DIR
from dtr_scale.launch.ledger import ledger_path, read_records

PRESETS = Path(CONFIG_DIR) / "cluster"


def load_preset(name: str, world_size: int = 2) -> ClusterConfig:
    """A cluster preset as the training config composes it (it may refer to ${world_size})."""
    root = OmegaConf.create({"world_size": world_size, "cluster": OmegaConf.load(PRESETS / f"{name}.yaml")})
    OmegaConf.resolve(root)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ClusterConfig), root.cluster))


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.1)


def results_within(job: submitit.Job, timeout_s: float) -> list:
    """job.results(), or cancel the job and fail after timeout_s."""
    try:
        wait_until(job.done, timeout_s, f"job {job.job_id} to end")
    except TimeoutError:
        job.cancel(check=False)
        raise
    return job.results()


def ledger_states(run_dir: str | Path) -> list[str]:
    return [r["state"] for r in read_records(run_dir)] if ledger_path(run_dir).exists() else []


def sacct_states(job_id: str) -> list[str]:
    """State of every run of a job, requeued ones included (-D), allocations only (-X)."""
    out = subprocess.run(["sacct", "-n", "-P", "-D", "-X", "-j", job_id, "-o", "State"],
                         check=True, capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def local_task_pids(job: submitit.Job) -> list[int]:
    """The task processes of a local-executor job: children of its controller (the job id)."""
    controller, pids = int(job.job_id), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == controller:
                pids.append(int(entry))
    return pids
