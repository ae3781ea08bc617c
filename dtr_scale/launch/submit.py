"""Submit a training run: one TrainingTask on the executor its cluster config describes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import submitit

from dtr_scale.config import ConfigError
from dtr_scale.config import ClusterConfig
from dtr_scale.launch.executor import make_executor
from dtr_scale.launch.task import TrainFn, TrainingTask


def submit_folder(cluster: ClusterConfig, run_dir: str | Path) -> Path:
    """Where submitit keeps one job's pickles and logs (%j: the job id)."""
    return Path(cluster.folder or Path(run_dir) / "submitit") / "%j"


def submit_training(cfg: Any, cluster: ClusterConfig, train_fn: TrainFn | None = None) -> submitit.Job:
    """Submit training of `cfg` (a TrainConfig: run_dir, steps, world_size) on `cluster`."""
    world_size = getattr(cfg, "world_size", cluster.world_size)
    if world_size != cluster.world_size:
        raise ConfigError(f"world_size: the run wants {world_size} processes but cluster gives "
                          f"nodes x tasks_per_node = {cluster.nodes} x {cluster.tasks_per_node}; "
                          f"set world_size={cluster.world_size} or change the cluster")
    executor = make_executor(cluster, submit_folder(cluster, cfg.run_dir), cfg.steps)
    return executor.submit(TrainingTask(cfg, train_fn))
