"""Map a submitit job's tasks onto torch.distributed's environment variables.

The training loop reads RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT (env:// rendezvous) and picks NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import submitit

PORT_BASE, PORT_SPAN = 20000, 20000


def master_port(job_id: str) -> int:
    """A port every task of a job derives alike, different for jobs that share a node,
    and the same after a requeue (same job id)."""
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def distributed_env(global_rank: int, local_rank: int, world_size: int, local_world_size: int,
                    hostnames: Sequence[str], job_id: str) -> dict[str, str]:
    """torch.distributed's variables for one task; rank 0 runs on the first host."""
    return {
        "RANK": str(global_rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "MASTER_ADDR": hostnames[0],
        "MASTER_PORT": str(master_port(job_id)),
    }


def job_distributed_env(job: submitit.JobEnvironment) -> dict[str, str]:
    """distributed_env for the task this process runs in (inside a submitit job)."""
    # The local executor runs every task on this machine; its hostname may not resolve.
    hostnames = ["127.0.0.1"] if job.cluster == "local" else list(job.hostnames)
    return distributed_env(job.global_rank, job.local_rank, job.num_tasks, job.num_tasks // job.num_nodes,
                           hostnames, job.raw_job_id)


def export_distributed_env(job: submitit.JobEnvironment) -> dict[str, str]:
    env = job_distributed_env(job)
    os.environ.update(env)
    return env


def threads_per_task(local_world_size: int, environ: dict[str, str] | None = None) -> int:
    """CPU threads for one task: SLURM's cpus-per-task, else this machine's CPUs shared
    among the node's tasks (several tasks each using every core slow each other down)."""
    environ = os.environ if environ is None else environ
    if environ.get("SLURM_CPUS_PER_TASK"):
        return int(environ["SLURM_CPUS_PER_TASK"])
    return max(1, len(os.sched_getaffinity(0)) // max(local_world_size, 1))
