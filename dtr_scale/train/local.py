"""Run the trainer on N local processes (gloo on CPU) without a cluster: for tests,
benchmarks and quick experiments. Clusters go through dtr_scale.launch."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp

from dtr_scale.config import TrainConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_after(step: int):
    """A stop_requested callback that asks to stop once `step` steps have been trained
    in this process (polled before each step)."""
    polls = {"n": 0}

    def stop_requested() -> bool:
        polls["n"] += 1
        return polls["n"] > step

    return stop_requested


def _worker(rank: int, cfg: TrainConfig, world_size: int, port: int, stop_at: int | None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    from dtr_scale.train.loop import train

    torch.set_num_threads(1)
    try:
        train(cfg, stop_requested=None if stop_at is None else stop_after(stop_at))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_processes(cfg: TrainConfig, nprocs: int, *, stop_at: int | None = None) -> None:
    """train(cfg) on `nprocs` local processes; `stop_at` stops (with a checkpoint) after that many steps."""
    if cfg.world_size != nprocs:
        raise ValueError(f"world_size: the config says {cfg.world_size}, but {nprocs} processes were asked for")
    mp.spawn(_worker, args=(cfg, nprocs, free_port(), stop_at), nprocs=nprocs, join=True)
