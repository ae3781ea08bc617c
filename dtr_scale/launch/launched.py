"""Training as one rank of a world that a launcher started itself (torchrun, or a plain srun
in a batch script), rather than a job submitit started."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from dtr_scale.config import ConfigError, TrainConfig
from dtr_scale.launch.environment import threads_per_task
from dtr_scale.train.loop import train
from dtr_scale.world import World, process_group


def train_in_launched_world(cfg: TrainConfig, world: dict[str, str],
                            prepare: Callable[[TrainConfig], None] | None = None,
                            on_checkpoint: Callable[[Path, int], None] | None = None) -> None:
    """train(cfg) as one rank of a world a launcher started (torchrun, or a plain srun):
    `world` holds that rank's torch.distributed variables. `prepare` (e.g. writing the
    embedded data set) runs on rank 0 while the other ranks wait for it; `on_checkpoint`
    is train()'s."""
    os.environ.update(world)
    if cfg.world_size != int(world["WORLD_SIZE"]):
        raise ConfigError(f"world_size: the config says {cfg.world_size} processes but the launcher started "
                          f"WORLD_SIZE={world['WORLD_SIZE']}; set world_size={world['WORLD_SIZE']}")
    if cfg.device != "cuda" and "OMP_NUM_THREADS" not in os.environ:  # torchrun sets it; srun does not
        torch.set_num_threads(threads_per_task(int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if cfg.device == "cuda":
        torch.cuda.set_device(int(world["LOCAL_RANK"]))
    with process_group(World.from_env(cfg.device), cfg.device, alone=True):
        # Each rank composed its own config: a default run_dir (a timestamp) may differ between them.
        run_dirs: list = [None] * int(world["WORLD_SIZE"])
        dist.all_gather_object(run_dirs, cfg.run_dir)
        if len(set(run_dirs)) > 1:
            raise ConfigError(f"run_dir: the ranks of this launch chose different run directories "
                              f"({', '.join(sorted(set(run_dirs))[:3])}); pass run_dir=PATH on the command line")
        if prepare is not None and world["RANK"] == "0":
            prepare(cfg)
        dist.barrier()
        train(cfg, on_checkpoint=on_checkpoint)
