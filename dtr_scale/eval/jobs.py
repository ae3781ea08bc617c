"""Evaluation as submitit jobs: one job per checkpoint, local processes or SLURM, that
evaluates all of its pending averagings on eval.world_size tasks (each samples its chunks,
task 0 merges and scores) and requeues itself when preempted, resuming at the next missing
chunk. Each item a job takes is recorded in the work log as submitted, with the job id."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import submitit

from dtr_scale.config import ClusterConfig, TrainConfig
from dtr_scale.eval.evaluate import evaluate_checkpoint
from dtr_scale.eval.results import eval_lock
from dtr_scale.eval.settings import eval_dir
from dtr_scale.eval.work_log import WorkItem, pending, record_event
from dtr_scale.launch.environment import export_distributed_env
from dtr_scale.launch.executor import make_executor
from dtr_scale.train.checkpoint import run_dir_of

EVAL_MAX_REQUEUES = 20  # preemptions of one evaluation job; each resumes at the next missing chunk

log = logging.getLogger(__name__)


class EvaluationTask(submitit.helpers.Checkpointable):
    """What an evaluation job runs: every given averaging of one checkpoint under one protocol,
    on all its tasks. A failure is recorded for each of its items (by task 0) and fails the job."""

    def __init__(self, checkpoint: Path, cfg: TrainConfig, averaging: list[str], keys: list[str],
                 protocol: str = "full") -> None:
        # not `self.checkpoint`: that is the method submitit calls on preemption
        self.checkpoint_path, self.cfg, self.averaging, self.keys = checkpoint, cfg, averaging, keys
        self.protocol = protocol

    def __call__(self) -> list[dict]:
        job = submitit.JobEnvironment()
        export_distributed_env(job)
        run_dir = run_dir_of(self.checkpoint_path)
        try:
            return evaluate_checkpoint(self.checkpoint_path, self.cfg, averaging=self.averaging, protocol=self.protocol)
        except Exception as err:
            if job.global_rank == 0:
                for key in self.keys:
                    record_event(run_dir, key, "failed", error=f"{type(err).__name__}: {err}", job_id=job.job_id)
            raise

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def eval_cluster(cfg: TrainConfig, cluster: ClusterConfig | None = None) -> ClusterConfig:
    """The cluster for evaluation jobs: `cluster`, else the run's, else local processes; with
    eval.world_size tasks on one node (one per GPU where it has GPUs)."""
    base = cluster or cfg.cluster or ClusterConfig(kind="local")
    tasks = cfg.eval.world_size
    return dataclasses.replace(base, nodes=1, tasks_per_node=tasks, gpus_per_node=tasks if base.gpus_per_node else 0,
                               job_name=f"{base.job_name}-eval",
                               max_requeues=base.max_requeues if base.max_requeues is not None else EVAL_MAX_REQUEUES)


def submit_items(run_dir: str | Path, items: list[WorkItem], cfg: TrainConfig,
                 cluster: ClusterConfig | None = None, *, retry_failed: bool = False) -> list[submitit.Job]:
    """One job per checkpoint and protocol for its items that are still pending; each is recorded as submitted
    with the job id. Looking, submitting and recording happen under the evaluation lock, so two
    evaluators never submit the same item."""
    cluster = eval_cluster(cfg, cluster)
    folder = Path(cluster.folder or eval_dir(run_dir) / "submitit") / "%j"
    executor = make_executor(cluster, folder, cfg.steps)
    jobs = []
    for checkpoint, protocol in sorted({(item.checkpoint, item.protocol) for item in items}):
        with eval_lock(run_dir):
            group = pending(run_dir, [i for i in items if (i.checkpoint, i.protocol) == (checkpoint, protocol)],
                            retry_failed=retry_failed)
            if not group:
                continue
            task = EvaluationTask(checkpoint, cfg, [i.averaging for i in group], [i.key for i in group], protocol)
            job = executor.submit(task)
            for item in group:
                record_event(run_dir, item.key, "submitted", job_id=job.job_id, cluster=cluster.kind,
                             folder=str(folder))
        log.info("submitted the %s evaluation of %s (%s) as job %s", protocol, checkpoint.name,
                 ", ".join(i.averaging for i in group), job.job_id)
        jobs.append(job)
    return jobs
