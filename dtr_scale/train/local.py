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


def loopback_interface() -> str:
    """The name of the loopback network interface ("lo" on Linux, "lo0" on macOS)."""
    names = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if not names:
        raise OSError("no loopback network interface (lo) found: local multi-process training needs one")
    return names[0]


def _worker(rank: int, cfg: TrainConfig, world_size: int, store_file: str, stop_at: int | None,
            log_level: int, on_checkpoint: Callable[[Path, int], None] | None) -> None:
    loopback = loopback_interface()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      GLOO_SOCKET_IFNAME=loopback, NCCL_SOCKET_IFNAME=loopback, OMP_NUM_THREADS="1")
    # a spawned process starts without the parent's logging setup: without this its INFO lines are lost
    logging.basicConfig(level=log_level, force=True,
                        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from dtr_scale.train.loop import train
    from dtr_scale.world import World, process_group

    torch.set_num_threads(1)
    with process_group(World.from_env(cfg.device), cfg.device, init_method=Path(store_file).as_uri()):
        train(cfg, stop_requested=None if stop_at is None else stop_after(stop_at), on_checkpoint=on_checkpoint)


def run_processes(cfg: TrainConfig, nprocs: int, *, stop_at: int | None = None,
                  on_checkpoint: Callable[[Path, int], None] | None = None) -> None:
    """train(cfg) on `nprocs` local processes; `stop_at` stops (with a checkpoint) after that many
    steps; `on_checkpoint` is train()'s (it must pickle: a module-level function or a partial)."""
    if cfg.world_size != nprocs:
        raise ValueError(f"world_size: the config says {cfg.world_size}, but {nprocs} processes were asked for")
    log_level = min(logging.getLogger().getEffectiveLevel(), logging.INFO)
    with tempfile.TemporaryDirectory(prefix="dtr-scale-store-") as tmp:
        mp.spawn(_worker, args=(cfg, nprocs, str(Path(tmp) / "store"), stop_at, log_level, on_checkpoint),
                 nprocs=nprocs, join=True)
