"""Map a submitit job's tasks (or the processes of a torchrun or plain srun launch) onto
torch.distributed's environment variables.

The training loop reads RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT (env:// rendezvous) and picks NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping, Sequence

import submitit
from submitit.slurm.slurm import SlurmJobEnvironment

PORT_BASE, PORT_SPAN = 20000, 20000
TORCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


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


def master_address(host: str, num_nodes: int) -> str:
    """The address of the job's first host, as every task resolves it alike. A multi-node
    job cannot rendezvous on a loopback address: each node would find its own."""
    try:
        address = socket.gethostbyname(host)
    except OSError as err:
        raise RuntimeError(f"MASTER_ADDR: the job's first host {host!r} does not resolve on "
                           f"{socket.gethostname()} ({err}); check the nodes' /etc/hosts or DNS") from None
    if num_nodes > 1 and ipaddress.ip_address(address).is_loopback:
        raise RuntimeError(f"MASTER_ADDR: the job's first host {host!r} resolves to the loopback address "
                           f"{address} on {socket.gethostname()}, so the other nodes cannot reach it; make "
                           "the host name resolve to the node's network address (its /etc/hosts or DNS)")
    return address


def job_distributed_env(job: submitit.JobEnvironment) -> dict[str, str]:
    """distributed_env for the task this process runs in (inside a submitit job): ranks from
    SLURM_PROCID, local ranks from SLURM_LOCALID, rank 0 on the first host of the node list."""
    # The local executor runs every task on this machine; its hostname may not resolve.
    master = "127.0.0.1" if job.cluster == "local" else master_address(job.hostnames[0], job.num_nodes)
    return distributed_env(job.global_rank, job.local_rank, job.num_tasks, job.num_tasks // job.num_nodes,
                           [master], job.raw_job_id)


def launched_world(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """torch.distributed's variables of a process that a launcher already placed in a world,
    or None when it was not (then the trainer starts its own processes).

    torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT itself. A plain
    `srun dtr-scale train ...` sets SLURM_PROCID, SLURM_LOCALID and SLURM_NTASKS for each task
    of its step (SLURM_STEP_ID marks a step); the batch script around it has SLURM_PROCID=0 but
    no step, so it does not count as a world (it is where `srun` or a submission starts from).
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        missing = [k for k in TORCH_VARIABLES if k not in environ]
        if missing:
            raise RuntimeError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} not: launch with torchrun, "
                               "which sets them all, or unset RANK and WORLD_SIZE to let the trainer start "
                               "its own processes")
        return {k: environ[k] for k in (*TORCH_VARIABLES, "LOCAL_WORLD_SIZE") if k in environ}
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return job_distributed_env(SlurmJobEnvironment())  # SLURM's variables, read as in a submitit job
    return None


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
