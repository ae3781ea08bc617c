"""A submitit task's place in the job, as torch.distributed's env:// variables."""

from __future__ import annotations

import os

from dtr_scale.launch.environment import PORT_BASE, PORT_SPAN, distributed_env, master_port, threads_per_task


def test_distributed_env_for_rank_9_of_16_on_two_nodes():
    env = distributed_env(global_rank=9, local_rank=1, world_size=16, local_world_size=8,
                          hostnames=["gpu-a01", "gpu-a02"], job_id="4242")
    assert env == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu-a01", "MASTER_PORT": str(master_port("4242"))}


def test_master_port_is_per_job_and_stable():
    assert master_port("4242") == master_port("4242") == PORT_BASE + 4242
    assert master_port("4242") != master_port("4243")
    assert PORT_BASE <= master_port("98765_3") < PORT_BASE + PORT_SPAN  # array job ids


def test_cpu_tasks_share_the_machine_unless_slurm_says_otherwise():
    cpus = len(os.sched_getaffinity(0))
    assert threads_per_task(1, {}) == cpus
    assert threads_per_task(2 * cpus, {}) == 1  # never zero
    assert threads_per_task(2, {"SLURM_CPUS_PER_TASK": "7"}) == 7
