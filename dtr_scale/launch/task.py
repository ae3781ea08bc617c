"""The callable a training job runs: submitit pickles it, and pickles it again
(through `checkpoint()`) each time the job is requeued."""

from __future__ import annotations

import logging
import os
import re
import socket
import traceback
from collections.abc import Callable
from typing import Any

import submitit
import torch
from submitit.core.utils import UncompletedJobError

from dtr_scale.launch.environment import export_distributed_env, threads_per_task
from dtr_scale.launch.ledger import append_record, ledger_path, last_step, read_records
from dtr_scale.launch.preemption import PreemptionSignal

# train(cfg, *, stop_requested) -> TrainResult(status="finished" | "stopped", step=...), as
# dtr_scale.train.loop.train: it resumes from the latest complete checkpoint in cfg.run_dir.
TrainFn = Callable[..., Any]


class TrainingTask(submitit.helpers.Checkpointable):
    """Train to cfg.steps. On preemption or the time limit every rank stops at the
    next step boundary after a complete checkpoint and the job requeues itself; the
    requeued job resumes from that checkpoint, so no step is trained twice. An error
    raised by training fails the job without a requeue and is kept in the ledger."""

    def __init__(self, cfg: Any, train_fn: TrainFn | None = None) -> None:
        self.cfg = cfg
        self.train_fn = train_fn  # None: dtr_scale.train.loop.train
        self.requeues = 0

    def __call__(self) -> Any:
        # The job's log is where a person follows the run (progress, ETA, resumes): log INFO there.
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        job = submitit.JobEnvironment()
        env = export_distributed_env(job)
        if not torch.cuda.is_available():
            torch.set_num_threads(threads_per_task(int(env["LOCAL_WORLD_SIZE"])))
        preemption = PreemptionSignal()
        run_dir, rank = self.cfg.run_dir, job.global_rank
        event = {"job_id": job.job_id, "requeues": self._requeue_count(), "start_step": self._start_step(),
                 "log": str(job.paths.stderr), "node": socket.gethostname()}
        if rank == 0:
            append_record(run_dir, "running", **event)
        try:
            result = self._train_fn()(self.cfg, stop_requested=preemption.requested)
        except Exception as err:
            lost = lost_peer(err, job)
            if not lost:
                append_record(run_dir, "failed", **event, rank=rank, **_describe(err))
                raise
            # Say which process went away: its own log holds the cause.
            failure = PeerLostError(f"rank {rank} on {event['node']}: {lost} went away ({type(err).__name__}: "
                                    f"{err}); see its log and the job's log {job.paths.stderr}")
            failure.__cause__ = err
            append_record(run_dir, "failed", **event, rank=rank, **_describe(failure))
            raise failure from err
        if result.status == "stopped":
            if rank == 0:
                reason = "time limit" if preemption.timed_out() else "preempted"
                append_record(run_dir, "requeued", **event, end_step=result.step, reason=reason)
            try:
                preemption.requeue()
            except Exception as err:  # the time-limit budget is spent, or scontrol requeue failed
                hint = ("raise cluster.max_requeues or cluster.time_min" if isinstance(err, UncompletedJobError)
                        else "the checkpoint is complete: submit the run again to resume")
                append_record(run_dir, "failed", **event, end_step=result.step, rank=rank, **_describe(err, hint))
                raise
        if rank == 0:
            append_record(run_dir, "finished", **event, end_step=result.step)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """The resubmission of this task. The checkpoint itself was written by train()
        before it returned "stopped"; if the signal came before training started, the
        latest complete checkpoint is still the one to resume from."""
        self.requeues += 1
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def _train_fn(self) -> TrainFn:
        if self.train_fn is not None:
            return self.train_fn
        from dtr_scale.train.loop import train

        return train

    def _requeue_count(self) -> int:
        # SLURM also counts requeues it made itself (a preemption past its grace time).
        return int(os.environ.get("SLURM_RESTART_COUNT", self.requeues))

    def _start_step(self) -> int:
        return last_step(read_records(self.cfg.run_dir)) if ledger_path(self.cfg.run_dir).exists() else 0


class PeerLostError(RuntimeError):
    """A collective failed because another rank of the job went away (killed, crashed, its node lost)."""


# gloo names the peer it lost by address and port: "Read error [10.1.2.3]:40123: Connection reset by peer"
PEER_ADDRESS = re.compile(r"\[(\d{1,3}(?:\.\d{1,3}){3})\]:\d+")


def lost_peer(err: BaseException, job: submitit.JobEnvironment) -> str:
    """'rank R on NODE' for the process a failed collective names, or '' when the error names none.
    SLURM places tasks in blocks: rank r runs on node r // tasks_per_node."""
    match = PEER_ADDRESS.search(str(err))
    if match is None or job.num_nodes < 1:
        return ""
    address = match.group(1)
    try:
        host = socket.gethostbyaddr(address)[0]
    except OSError:
        return f"the process at {address}"
    hosts, per_node = list(job.hostnames), job.num_tasks // job.num_nodes
    ranks = [r for r in range(job.num_tasks) if r // per_node < len(hosts) and hosts[r // per_node] == host]
    if not ranks:
        return f"the process at {address} ({host})"
    return f"rank {ranks[0]} on {host}" if len(ranks) == 1 else f"one of ranks {ranks} on {host}"


def _describe(err: BaseException, hint: str = "") -> dict[str, str]:
    message = f"{type(err).__name__}: {err}" + (f" ({hint})" if hint else "")
    return {"error": message, "traceback": "".join(traceback.format_exception(err))}
