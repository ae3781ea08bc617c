"""The callable a training job runs: submitit pickles it, and pickles it again
(through `checkpoint()`) each time the job is requeued."""

from __future__ import annotations

import os
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
        job = submitit.JobEnvironment()
        env = export_distributed_env(job)
        if not torch.cuda.is_available():
            torch.set_num_threads(threads_per_task(int(env["LOCAL_WORLD_SIZE"])))
        preemption = PreemptionSignal()
        run_dir, rank = self.cfg.run_dir, job.global_rank
        event = {"job_id": job.job_id, "requeues": self._requeue_count(), "start_step": self._start_step(),
                 "log": str(job.paths.stderr)}
        if rank == 0:
            append_record(run_dir, "running", **event)
        try:
            result = self._train_fn()(self.cfg, stop_requested=preemption.requested)
        except Exception as err:
            append_record(run_dir, "failed", **event, rank=rank, **_describe(err))
            raise
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


def _describe(err: BaseException, hint: str = "") -> dict[str, str]:
    message = f"{type(err).__name__}: {err}" + (f" ({hint})" if hint else "")
    return {"error": message, "traceback": "".join(traceback.format_exception(err))}
