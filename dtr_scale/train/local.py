"""Run the trainer on N local processes (gloo on CPU) without a cluster: for tests,
benchmarks and quick experiments. Clusters go through dtr_scale.launch.

The processes meet through a file store (c10d's TCP store would listen on every
interface) and talk over the loopback interface only; each logs to stderr with
its rank in every line."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch.multiprocessing as mp

from dtr_scale.config import ConfigError, TrainConfig


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


def loopback_interface() -> str:
    """The name of the loopback network interface ("lo" on Linux, "lo0" on macOS)."""
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if not names:
        raise OSError("no loopback network interface (lo) found: local multi-process training needs one")
    return names[0]


def _worker(rank: int, cfg: TrainConfig, world_size: int, store_file: str, stop_at: int | None,
            log_level: int) -> None:
    loopback = loopback_interface()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      GLOO_SOCKET_IFNAME=loopback, NCCL_SOCKET_IFNAME=loopback, OMP_NUM_THREADS="1")
    # a spawned process starts without the parent's logging setup: without this its INFO lines are lost
    logging.basicConfig(level=log_level, force=True,
                        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    import torch.distributed as dist

    from dtr_scale.train.loop import train

    torch.set_num_threads(1)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cfg.device == "cuda" else "gloo",
                            init_method=Path(store_file).as_uri(), rank=rank, world_size=world_size)
    try:
        train(cfg, stop_requested=None if stop_at is None else stop_after(stop_at))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train_in_launched_world(cfg: TrainConfig, world: dict[str, str],
                            prepare: Callable[[TrainConfig], None] | None = None) -> None:
    """train(cfg) as one rank of a world a launcher started (torchrun, or a plain srun):
    `world` holds that rank's torch.distributed variables. `prepare` (e.g. writing the
    embedded data set) runs on rank 0 while the other ranks wait for it."""
    import torch
    import torch.distributed as dist

    from dtr_scale.launch.environment import threads_per_task
    from dtr_scale.train.loop import train

    os.environ.update(world)
    if cfg.world_size != int(world["WORLD_SIZE"]):
        raise ConfigError(f"world_size: the config says {cfg.world_size} processes but the launcher started "
                          f"WORLD_SIZE={world['WORLD_SIZE']}; set world_size={world['WORLD_SIZE']}")
    if cfg.device != "cuda" and "OMP_NUM_THREADS" not in os.environ:  # torchrun sets it; srun does not
        torch.set_num_threads(threads_per_task(int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if cfg.device == "cuda":
        torch.cuda.set_device(int(world["LOCAL_RANK"]))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cfg.device == "cuda" else "gloo")
    try:
        # Each rank composed its own config: a default run_dir (a timestamp) may differ between them.
        run_dirs: list = [None] * int(world["WORLD_SIZE"])
        dist.all_gather_object(run_dirs, cfg.run_dir)
        if len(set(run_dirs)) > 1:
            raise ConfigError(f"run_dir: the ranks of this launch chose different run directories "
                              f"({', '.join(sorted(set(run_dirs))[:3])}); pass run_dir=PATH on the command line")
        if prepare is not None and world["RANK"] == "0":
            prepare(cfg)
        dist.barrier()
        train(cfg)
    finally:
        dist.destroy_process_group()


def run_processes(cfg: TrainConfig, nprocs: int, *, stop_at: int | None = None) -> None:
    """train(cfg) on `nprocs` local processes; `stop_at` stops (with a checkpoint) after that many steps."""
    if cfg.world_size != nprocs:
        raise ValueError(f"world_size: the config says {cfg.world_size}, but {nprocs} processes were asked for")
    log_level = min(logging.getLogger().getEffectiveLevel(), logging.INFO)
    with tempfile.TemporaryDirectory(prefix="dtr-scale-store-") as tmp:
        mp.spawn(_worker, args=(cfg, nprocs, str(Path(tmp) / "store"), stop_at, log_level), nprocs=nprocs, join=True)
