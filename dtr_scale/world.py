"""Where this process sits in a distributed job, as the launchers describe it.

torchrun, a plain srun (through dtr_scale.launch.environment) and the local
process launcher all set RANK, LOCAL_RANK and WORLD_SIZE; a process started
without them is the only rank of a world of one. Training, evaluation and the
launchers read their place from here, and nowhere else; and `process_group` is the one
place a process joins (and leaves) the world's default process group.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in [0, world size {self.size}); check RANK and WORLD_SIZE")

    @classmethod
    def from_env(cls, device: str = "cpu", environ: Mapping[str, str] | None = None) -> World:
        """This process's place from RANK / LOCAL_RANK / WORLD_SIZE (0, 0, 1 where unset); on
        device "cuda" its GPU is the one numbered LOCAL_RANK."""
        env = os.environ if environ is None else environ
        local_rank = int(env.get("LOCAL_RANK", 0))
        place = torch.device("cuda", local_rank) if device == "cuda" else torch.device(device)
        return cls(int(env.get("RANK", 0)), local_rank, int(env.get("WORLD_SIZE", 1)), place)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor (an FSDP2 shard) gathered from every rank (collective), any other as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def group_backend(device: str) -> str:
    """gloo for CPU tensors; on GPUs NCCL for CUDA tensors, with gloo beside it for the CPU
    tensors of host-side agreements (the stop request) that must not wait for a GPU."""
    return "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"


def join_process_group(world: World, device: str, *, init_method: str | None = None) -> None:
    """Join the default process group of `world` (the one place this project creates it): through
    `init_method` (a file store's URL) or the launcher's MASTER_ADDR / MASTER_PORT; a world of one
    meets in an in-memory store, so nothing listens on a port."""
    if world.size == 1 and init_method is None:
        dist.init_process_group(group_backend(device), store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(group_backend(device), init_method=init_method, rank=world.rank,
                                world_size=world.size)


@contextlib.contextmanager
def process_group(world: World, device: str, *, init_method: str | None = None,
                  alone: bool = False) -> Iterator[None]:
    """The default process group of `world` for the block (join_process_group), destroyed on the
    way out, also after an error. A world of one needs none, unless `alone` (DDP and FSDP2
    measured on one device wrap only inside one). A group that exists already is used as it is,
    and left to whoever made it."""
    if dist.is_initialized() or (world.size == 1 and not alone):
        yield
        return
    join_process_group(world, device, init_method=init_method)
    try:
        yield
    finally:
        dist.destroy_process_group()
