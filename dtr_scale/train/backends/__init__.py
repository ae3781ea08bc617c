"""Distribution strategies behind one small interface, so the loop is written once.

A backend owns the wrapped module, the optimizer and how both are saved; `Backend`
below is that interface, and DDP/FSDP2 (`torch_dist.TorchBackend`) and DeepSpeed
ZeRO (`deepspeed.DeepSpeedBackend`) implement it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from dtr_scale.config import TrainConfig
from dtr_scale.world import World

if TYPE_CHECKING:
    from dtr_scale.train.components import DiffusionTrainModule


class Backend(Protocol):
    """What the training loop and the checkpoint manager call; nothing else of a backend is used."""

    def setup(self, module: DiffusionTrainModule, ema: nn.Module) -> None:
        """Wrap model + objective (and the EMA copy) for this strategy and build the optimizer."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's groups ("model", and "uw" with ANT-UW), for logging and the config's lrs."""

    def forward(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """One micro-batch (x0, y, t, noise, drop) through the wrapped module."""

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        """The gradient-sync boundary for accumulation: gradients are reduced when `last`."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm before clipping to `max_norm` (inf: measure only)."""

    def step(self, apply: torch.Tensor | None = None) -> None:
        """Apply this step's gradients; with `apply` (a bool tensor on the device), only where it is
        true, else as skip() (masked on the device where the optimizer can, without a host sync)."""

    def skip(self) -> None:
        """Drop this step's gradients (no update, no optimizer step count)."""

    def update_ema(self, decay: float) -> None: ...

    def save(self, path: Path, *, extra: Mapping[str, Stateful] = ..., asynchronous: bool = False) -> Future | None:
        """Write model, EMA, optimizer and the `extra` stateful objects under directory `path`
        (collective); a Future when the write finishes in the background."""

    def load(self, path: Path, *, extra: Mapping[str, Stateful] = ...) -> None:
        """Load what `save` wrote into the wrapped module, EMA, optimizer and `extra`."""

    def full_state(self, which: str) -> dict[str, torch.Tensor] | None:
        """Unsharded "ema" or "model" weights on rank 0 (collective), None on the others."""

    @property
    def grads_sharded(self) -> bool:
        """Whether each rank holds only a shard of every gradient (FSDP2), so sums over a gradient's
        elements need an all-reduce; with DDP every rank holds the whole, averaged gradient."""

    def take_local_grads(self) -> list[torch.Tensor]:
        """This rank's part of each trainable parameter's gradient (the shard under FSDP2, zeros
        where a parameter has none), in a fixed order; the parameters' gradients are dropped."""

    def set_local_grads(self, grads: list[torch.Tensor]) -> None:
        """Make `grads` (this rank's parts, in take_local_grads' order) the parameters' gradients."""

    @staticmethod
    def read_weights(path: Path, which: str) -> dict[str, torch.Tensor]:
        """The whole weights `which` ("ema" or "raw") of a checkpoint this backend wrote at `path`,
        on the CPU under the official DiT names, without the backend set up or a process group."""


WEIGHTS = ("ema", "raw")  # the trainer's per-step EMA; the optimizer's weights


def make_backend(cfg: TrainConfig, world: World) -> Backend:
    if cfg.backend.name == "deepspeed":
        from dtr_scale.train.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, world)
    from dtr_scale.train.backends.torch_dist import TorchBackend

    return TorchBackend(cfg, world)


def read_weights(path: str | Path, which: str) -> dict[str, torch.Tensor]:
    """The whole model weights `which` ("ema" or "raw") of checkpoint `path`, on the CPU, under the
    official DiT names, read by the backend that wrote it. Reads only those tensors: the optimizer
    and the other copy stay on disk. The caller checks the checkpoint first (open_checkpoint)."""
    from dtr_scale.train.backends.deepspeed import DeepSpeedBackend
    from dtr_scale.train.backends.torch_dist import TorchBackend

    if which not in WEIGHTS:
        raise ValueError(f"weights {which!r} are not one of {', '.join(WEIGHTS)}")
    reader = DeepSpeedBackend if DeepSpeedBackend.wrote(Path(path)) else TorchBackend
    return reader.read_weights(Path(path), which)
