"""Where and how a training run is launched: the `cluster` config group.

`kind: local` runs the job as local processes through submitit's local
executor; `kind: slurm` submits it with sbatch. One task per GPU: on GPUs
`tasks_per_node` equals `gpus_per_node`; on CPU it is the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dtr_scale.config as _config  # module import: dtr_scale.config may import this file

CLUSTER_KINDS = ("local", "slurm")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _config.ConfigError(f"cluster.{key}: {message}")


@dataclass
class ClusterConfig:
    kind: str = "local"  # local | slurm
    folder: str | None = None  # submitit logs and pickles; default <run_dir>/submitit
    job_name: str = "dtr-scale"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: gpus_per_node, or 1 without GPUs
    cpus_per_task: int | None = None
    mem_gb: float | None = None  # per node; null leaves it to the cluster's default
    time_min: int = 60  # wall-clock limit of one job; longer runs requeue themselves
    # The preemption/time-limit signal (USR2) comes this long before the limit;
    # it must cover one training step plus writing a checkpoint.
    signal_delay_s: int = 120
    # Time-limit requeues allowed; null sizes it from the run length (steps x step_seconds).
    max_requeues: int | None = None
    step_seconds: float = 1.0  # expected wall seconds per training step, for max_requeues
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module load, ...)
    sbatch_extra: dict[str, Any] = field(default_factory=dict)  # any other #SBATCH --key=value (true: bare --key)

    def __post_init__(self) -> None:
        _require(self.kind in CLUSTER_KINDS, "kind", f"got {self.kind!r}, expected one of {', '.join(CLUSTER_KINDS)}")
        _require(self.nodes >= 1, "nodes", f"got {self.nodes}, must be >= 1")
        _require(self.kind != "local" or self.nodes == 1, "nodes",
                 "the local executor runs on one machine; set nodes=1 or use kind=slurm")
        _require(self.gpus_per_node >= 0, "gpus_per_node", f"got {self.gpus_per_node}, must be >= 0")
        if self.tasks_per_node is None:
            self.tasks_per_node = self.gpus_per_node or 1
        _require(self.tasks_per_node >= 1, "tasks_per_node", f"got {self.tasks_per_node}, must be >= 1")
        _require(self.gpus_per_node == 0 or self.tasks_per_node == self.gpus_per_node, "tasks_per_node",
                 f"got {self.tasks_per_node} with gpus_per_node={self.gpus_per_node}; training runs one task "
                 f"per GPU, so set tasks_per_node={self.gpus_per_node} (or leave it null)")
        _require(self.cpus_per_task is None or self.cpus_per_task >= 1, "cpus_per_task", "must be >= 1 or null")
        _require(self.mem_gb is None or self.mem_gb > 0, "mem_gb", "must be > 0 or null")
        _require(self.time_min >= 1, "time_min", f"got {self.time_min}, must be >= 1 minute")
        _require(0 < self.signal_delay_s < self.time_min * 60, "signal_delay_s",
                 f"got {self.signal_delay_s}, must be in (0, time_min * 60 = {self.time_min * 60})")
        _require(self.max_requeues is None or self.max_requeues >= 0, "max_requeues", "must be >= 0 or null")
        _require(self.step_seconds > 0, "step_seconds", f"got {self.step_seconds}, must be > 0")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node
