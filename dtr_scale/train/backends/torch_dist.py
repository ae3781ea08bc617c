"""DDP and FSDP2 (`fully_shard` per DiT block), saved with torch.distributed.checkpoint.

DCP stores every tensor under its parameter name, so a checkpoint written by
either wrapper on any number of ranks loads into either wrapper on any other
number of ranks (DCP reshards on load).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from dtr_scale.config import TrainConfig
from dtr_scale.train.components import build_optimizer
from dtr_scale.train.safe_dcp import dcp_load, read_dcp_tensors
from dtr_scale.train.ema import ema_pairs, update_ema
from dtr_scale.train.speed import apply_speed_switches, autocast
from dtr_scale.world import World, full_tensor


# where _state puts the model weights: DCP flattens nested keys with "."
DCP_PREFIX = {"ema": "ema.", "raw": "module.model."}


class TorchBackend:
    def __init__(self, cfg: TrainConfig, world: World):
        self.cfg = cfg
        self.world = world
        self.device = cfg.device
        self.async_group = None

    # setup -------------------------------------------------------------------

    def setup(self, module: nn.Module, ema: nn.Module) -> None:
        b = self.cfg.backend
        module.to(self.device)
        ema.to(self.device)
        apply_speed_switches(module.model, b)
        # wrapped wherever a process group exists, also one of a single process (how `dtr-bench gpu`
        # measures DDP and FSDP2 on one GPU); training without one runs the plain module
        if b.name == "fsdp" and dist.is_initialized():
            policy = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16 if b.precision == "bf16" else None, reduce_dtype=torch.float32)
            for shard_root in (module.model, ema):
                for block in shard_root.blocks:
                    fully_shard(block, mp_policy=policy)
            fully_shard(module, mp_policy=policy)
            fully_shard(ema)
            self.wrapped = module
        elif dist.is_initialized():
            self.wrapped = nn.parallel.DistributedDataParallel(module)
        else:
            self.wrapped = module
        self.module, self.ema = module, ema
        self._ema_pairs = ema_pairs(ema, module.model)  # after wrapping: FSDP2 replaces the parameters
        self.optimizer = build_optimizer(module.model, module.objective, self.cfg)
        if dist.is_initialized() and self.cfg.checkpoint.async_save:
            # background saves run their collectives on a group of their own, never
            # interleaved with the training step's
            self.async_group = dist.new_group(backend="gloo")

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    # step --------------------------------------------------------------------

    def forward(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        with autocast(self.cfg.backend, torch.device(self.device).type):
            return self.wrapped(*(x.to(self.device) for x in inputs))

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are all-reduced only on the last micro-batch of a step."""
        if isinstance(self.wrapped, nn.parallel.DistributedDataParallel) and not last:
            return self.wrapped.no_sync()
        if hasattr(self.wrapped, "set_requires_gradient_sync"):
            self.wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if math.isfinite(max_norm):  # an infinite max_norm scales by exactly 1: skip the pass over the gradients
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
        return full_tensor(norm)

    def step(self, apply: torch.Tensor | None = None) -> None:
        """With `apply` (a bool tensor), fused AdamW masks the update on the device through its
        found_inf input, as GradScaler uses it: no host sync. Other optimizers read it on the host."""
        fused = bool(self.optimizer.defaults.get("fused"))
        if apply is not None and not fused and not bool(apply):
            return self.skip()
        self.optimizer.found_inf = (~apply).float() if apply is not None and fused else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def grads_sharded(self) -> bool:
        return isinstance(next(self._trainable()), DTensor)

    def take_local_grads(self) -> list[torch.Tensor]:
        grads = [_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p)) for p in self._trainable()]
        for p in self._trainable():
            p.grad = None
        return grads

    def set_local_grads(self, grads: list[torch.Tensor]) -> None:
        for p, grad in zip(self._trainable(), grads, strict=True):
            p.grad = _like(p, grad.view_as(_local(p)).to(p.dtype))

    def _trainable(self):
        return (p for p in self.module.parameters() if p.requires_grad)

    def update_ema(self, decay: float) -> None:
        update_ema(self._ema_pairs, decay)

    # state -------------------------------------------------------------------

    def _state(self, extra: Mapping[str, Stateful]) -> dict:
        """DCP's keys: "module" (model.* and objective.*), "optim", "ema", then each extra object's name
        (DCP_PREFIX says where the weights are)."""
        module_state, optim_state = get_state_dict(self.module, self.optimizer)
        return {"module": module_state, "optim": optim_state, "ema": get_model_state_dict(self.ema), **extra}

    def save(self, path: Path, *, extra: Mapping[str, Stateful] = {}, asynchronous: bool = False) -> Future | None:
        """Write the state under directory `path` (collective). With `asynchronous`
        the tensors are staged to CPU memory and written in the background."""
        with warnings.catch_warnings():  # DCP's note that it saves without a process group: intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            if asynchronous:
                result = dcp.async_save(self._state(extra), checkpoint_id=str(path), process_group=self.async_group)
                return getattr(result, "upload_completion", result)  # newer torch returns a response pair
            dcp.save(self._state(extra), checkpoint_id=str(path))
        return None

    def load(self, path: Path, *, extra: Mapping[str, Stateful] = {}) -> None:
        state = self._state(extra)
        dcp_load(state, path)  # never unpickles code from the checkpoint's files; loads `extra` in place
        set_state_dict(self.module, self.optimizer, model_state_dict=state["module"], optim_state_dict=state["optim"])
        set_model_state_dict(self.ema, state["ema"])

    def full_state(self, which: str) -> dict[str, torch.Tensor] | None:
        source = self.ema if which == "ema" else self.module.model
        state = get_model_state_dict(source, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.world.rank == 0 else None


    @staticmethod
    def read_weights(path: Path, which: str) -> dict[str, torch.Tensor]:
        return read_dcp_tensors(path, DCP_PREFIX[which], "EMA weights" if which == "ema" else "model weights")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the shard of an FSDP2 DTensor, else the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _like(param: nn.Parameter, local: torch.Tensor) -> torch.Tensor:
    """A gradient for `param` from this rank's part: a DTensor laid out as the parameter under FSDP2."""
    if isinstance(param, DTensor):
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())
    return local
