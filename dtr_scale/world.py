"""Where this process sits in a distributed job, as the launchers describe it.

torchrun, a plain srun (through dtr_scale.launch.environment) and the local
process launcher all set RANK, LOCAL_RANK and WORLD_SIZE; a process started
without them is the only rank of a world of one. Training, evaluation and the
launchers read their place from here, and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch


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
