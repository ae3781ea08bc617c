"""Build a submitit executor from a `cluster` config."""

from __future__ import annotations

import math
from pathlib import Path

import submitit

from dtr_scale.config import ClusterConfig

# srun ends the whole step when one rank dies, so a crash on one rank cannot
# leave the others blocked in a collective.
SRUN_ARGS = ("--kill-on-bad-exit=1",)


def requeue_budget(steps: int, step_seconds: float, time_min: int, signal_delay_s: int) -> int:
    """Time-limit requeues a run of `steps` needs: one per job-length segment, doubled, plus 3.

    Only time-limit stops count against submitit's budget, and so does a
    preemption late in a job (after min(0.8 x limit, limit - 10 min)); the slack
    covers those and short segments lost to startup.
    """
    usable_s = max(time_min * 60 - signal_delay_s, 1)
    segments = math.ceil(steps * step_seconds / usable_s)
    return 2 * segments + 3


def max_requeues(cluster: ClusterConfig, steps: int) -> int:
    if cluster.max_requeues is not None:
        return cluster.max_requeues
    return requeue_budget(steps, cluster.step_seconds, cluster.time_min, cluster.signal_delay_s)


def slurm_parameters(cluster: ClusterConfig) -> dict:
    """SlurmExecutor parameters (sbatch flags) for a cluster config."""
    params: dict = {
        "job_name": cluster.job_name,
        "nodes": cluster.nodes,
        "ntasks_per_node": cluster.tasks_per_node,
        "time": cluster.time_min,
        "signal_delay_s": cluster.signal_delay_s,
        "srun_args": list(SRUN_ARGS),
    }
    optional = {
        "partition": cluster.partition,
        "account": cluster.account,
        "qos": cluster.qos,
        "constraint": cluster.constraint,
        "cpus_per_task": cluster.cpus_per_task,
        "gpus_per_node": cluster.gpus_per_node or None,
        "mem": f"{int(cluster.mem_gb * 1024)}MB" if cluster.mem_gb else None,
        "setup": list(cluster.setup) or None,
        "additional_parameters": dict(cluster.sbatch_extra) or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def local_parameters(cluster: ClusterConfig) -> dict:
    """LocalExecutor parameters: the same processes, GPUs and limits, on this machine."""
    params: dict = {
        "tasks_per_node": cluster.tasks_per_node,
        "gpus_per_node": cluster.gpus_per_node,
        "timeout_min": cluster.time_min,
        "signal_delay_s": cluster.signal_delay_s,
    }
    if cluster.setup:
        params["setup"] = list(cluster.setup)
    return params


def make_executor(cluster: ClusterConfig, folder: str | Path, steps: int) -> submitit.Executor:
    """A submitit executor for `cluster`, writing its logs under `folder`, allowed
    enough time-limit requeues for a run of `steps` training steps."""
    requeues = max_requeues(cluster, steps)
    if cluster.kind == "local":
        executor = submitit.LocalExecutor(folder, max_num_timeout=requeues)
        executor.update_parameters(**local_parameters(cluster))
        return executor
    try:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=requeues)
    except RuntimeError as err:  # raised when srun is not on PATH
        raise RuntimeError(f"cluster.kind=slurm but this machine has no SLURM client ({err}); run from a "
                           "login node, start the test cluster with slurm/start-cluster.sh, or use "
                           "cluster=local") from None
    executor.update_parameters(**slurm_parameters(cluster))
    return executor
