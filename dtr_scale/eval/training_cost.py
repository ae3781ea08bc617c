"""What training had spent when it reached a checkpoint: wall time and GPU-hours (time to FID).

From the job ledger (RUN_DIR/jobs.jsonl: when each job started and ended, at which steps) and
the logged step times (RUN_DIR/metrics.jsonl: `time`, `step`, `images_per_s` over each log
interval and `images_per_s_per_device`, whose ratio is the world size). A job's whole wall time
counts, start-up and the steps a preemption threw away included, times the world size it ran
with; the job that wrote the checkpoint counts up to the moment it reached that step
(interpolated between log records). Without a ledger (a run trained by `train()` directly) the
sum of the logged step times stands in. Requeues and world-size changes are separate jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from dtr_scale.io import read_jsonl
from dtr_scale.launch.ledger import ledger_path
from dtr_scale.train.metrics import read_metrics

END_STATES = ("requeued", "finished", "failed")


@dataclass(frozen=True)
class TrainingCost:
    wall_s: float  # wall-clock seconds of the jobs that brought training to the step
    gpu_hours: float  # the same, times each job's world size

    def record_fields(self) -> dict[str, float]:
        return {"train_wall_s": self.wall_s, "gpu_hours": self.gpu_hours}


@dataclass(frozen=True)
class Job:
    """One job of the run (a start in the ledger) and the log records it wrote."""

    start_time: float
    start_step: int
    end_time: float | None  # None: still running, or killed without a ledger line
    end_step: int | None
    points: list[tuple[float, int]]  # (time, step) of its log records, in order
    world_size: int

    def reached(self, step: int) -> bool:
        return any(s >= step for _, s in self.points) or (self.end_step is not None and self.end_step >= step)

    def time_at(self, step: int) -> float:
        """When this job reached `step`: linear between the log records around it."""
        track = [(self.start_time, self.start_step), *self.points]
        if self.end_time is not None and self.end_step is not None:
            track.append((self.end_time, self.end_step))
        (t0, s0), (t1, s1) = next((track[i - 1], track[i]) for i in range(1, len(track)) if track[i][1] >= step)
        return t0 if s1 == s0 else t0 + (t1 - t0) * (step - s0) / (s1 - s0)

    def last_time(self) -> float:
        return self.end_time if self.end_time is not None else max([self.start_time, *(t for t, _ in self.points)])


def unix_time(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def world_size_of(records: list[dict[str, Any]], default: int) -> int:
    # images/s over images/s per device: the world size that logged them
    for r in records:
        if r.get("images_per_s") and r.get("images_per_s_per_device"):
            return max(1, round(r["images_per_s"] / r["images_per_s_per_device"]))
    return default


def ledger_jobs(ledger: list[dict[str, Any]], metrics: list[dict[str, Any]], default_world_size: int) -> list[Job]:
    """The run's jobs in start order: each 'running' line, the first end line of the same job
    (job id and requeue count) after it, and the log records written in between."""
    jobs = []
    for i, start in enumerate(ledger):
        if start["state"] != "running":
            continue
        same = (start.get("job_id"), start.get("requeues"))
        end = next((r for r in ledger[i + 1:] if r["state"] in END_STATES
                    and (r.get("job_id"), r.get("requeues")) == same), None)
        t0 = unix_time(start["time"])
        t1 = unix_time(end["time"]) if end is not None else None
        own = [r for r in metrics if r["time"] >= t0 and (t1 is None or r["time"] <= t1 + 1.0)  # ledger: whole seconds
               and r["step"] > start.get("start_step", 0)]
        jobs.append(Job(t0, start.get("start_step", 0), t1, end.get("end_step") if end else None,
                        [(r["time"], r["step"]) for r in own], world_size_of(own, default_world_size)))
    return jobs


def cost_from_jobs(step: int, jobs: list[Job]) -> TrainingCost | None:
    """The jobs before the last one that reached `step` count whole; that one up to the step."""
    started = [job for job in jobs if job.start_step < step]
    writer = next((i for i in range(len(started) - 1, -1, -1) if started[i].reached(step)), None)
    if writer is None:
        return None
    spans = [(job.last_time() - job.start_time, job.world_size) for job in started[:writer]]
    spans.append((started[writer].time_at(step) - started[writer].start_time, started[writer].world_size))
    return TrainingCost(sum(s for s, _ in spans), sum(s * w for s, w in spans) / 3600)


def cost_from_step_times(step: int, metrics: list[dict[str, Any]], default_world_size: int) -> TrainingCost | None:
    """Sum of logged step times up to `step`: each record's interval at its images/s."""
    wall = gpu = 0.0
    previous = 0
    for r in sorted(metrics, key=lambda r: r["step"]):
        if not r.get("images_per_s") or not r.get("images_seen"):
            continue
        batch = r["images_seen"] / r["step"]
        seconds = (min(r["step"], step) - previous) * batch / r["images_per_s"]
        wall += seconds
        gpu += seconds * world_size_of([r], default_world_size) / 3600
        previous = r["step"]
        if previous >= step:
            return TrainingCost(wall, gpu)
    return None


def training_cost(run_dir: str | Path, step: int, default_world_size: int = 1) -> TrainingCost | None:
    """What the run in run_dir had spent when training reached `step` (None where its logs do
    not reach that far)."""
    metrics = read_metrics(run_dir)
    if ledger_path(run_dir).exists():
        cost = cost_from_jobs(step, ledger_jobs(read_jsonl(ledger_path(run_dir)), metrics, default_world_size))
        if cost is not None:
            return cost
    return cost_from_step_times(step, metrics, default_world_size)
