"""Helpers of the launch tests: cluster presets as composed, and waiting on and poking at real jobs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import submitit
from omegaconf import OmegaConf

from dtr_scale.config import ClusterConfig
from dtr_scale.configs import CONFIG_DIR
from dtr_scale.launch.follow import job_over
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


def results_within(job: submitit.Job, timeout_s: float, run_dir: str | Path | None = None) -> list:
    """job.results() once the job is over as `dtr-scale train` judges it (job_over), or cancel
    the job and fail after timeout_s."""
    try:
        wait_until(lambda: job_over(job, run_dir), timeout_s, f"job {job.job_id} to end")
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


def _processes():
    """(pid, parent pid, environment entries, command line) of every process on this machine,
    every node's network namespace included."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:  # the process ended meanwhile
                continue
            yield int(entry), int(stat.rsplit(")", 1)[1].split()[1]), environ, command


def local_task_pids(job: submitit.Job) -> list[int]:
    """The task processes of a local-executor job: children of its controller (the job id)."""
    return [pid for pid, parent, _, _ in _processes() if parent == int(job.job_id)]


def slurm_task_pids(job_id: str, rank: int | None = None) -> list[int]:
    """The task processes of a SLURM job (those of one global rank, if given): the submitit
    entry points that carry the job's id, not their children."""
    wanted = [f"SLURM_JOB_ID={job_id}".encode()] + ([] if rank is None else [f"SLURM_PROCID={rank}".encode()])
    parents = {pid: parent for pid, parent, environ, command in _processes()
               if all(entry in environ for entry in wanted) and b"submitit.core._submit" in command}
    return sorted(pid for pid, parent in parents.items() if parent not in parents)


def _status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict ({} once the process is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {key: value.strip() for key, value in (line.split(":", 1) for line in lines)}


def _stopped(pid: int) -> bool:
    return _status(pid).get("State", "").startswith("T")


def _stopped_awaiting(pid: int, signum: int) -> bool:
    """Whether `pid` is stopped and `signum` is not yet pending in it."""
    status = _status(pid)
    if not status.get("State", "").startswith("T"):
        return False
    pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
    return not pending & (1 << (signum - 1))


def preempt_paused(job_id: str, preempt: Callable[[], None], timeout_s: float = 60) -> None:
    """Stop the job's tasks, call preempt() (say, submit a job that needs their nodes), wait
    until SLURM's SIGUSR2 is pending in every stopped task, and let them go on. However fast the
    tasks train, the preemption lands where the test stopped them, not after the job finished."""
    pids = slurm_task_pids(job_id)
    assert pids, f"no task of job {job_id} runs"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: all(_stopped(pid) for pid in pids), 10, "the tasks to stop")
        preempt()
        wait_until(lambda: not any(_stopped_awaiting(pid, signal.SIGUSR2) for pid in pids), timeout_s,
                   "SLURM's USR2 to reach every task")
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # a task that ended meanwhile
                os.kill(pid, signal.SIGCONT)
