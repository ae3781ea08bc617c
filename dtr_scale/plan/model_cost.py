"""What one DiT costs: its exact parameter count, and (from models.cost, which the training
loop's MFU uses too) its shape and analytic forward multiply-accumulates per image."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dtr_scale.config import TrainConfig
from dtr_scale.models.cost import DiTShape, dit_shape, forward_macs, forward_macs_breakdown  # the planner's too
from dtr_scale.train.components import build_model

__all__ = ["DiTShape", "ParameterCount", "count_parameters", "dit_shape", "forward_macs", "forward_macs_breakdown"]


@dataclass(frozen=True)
class ParameterCount:
    total: int  # trainable parameters
    per_block: int  # one DiT block: the unit FSDP and activation checkpointing work in
    state_bytes: int  # one fp32 copy of the state dict (parameters and persistent buffers)


def count_parameters(cfg: TrainConfig) -> ParameterCount:
    """Exact counts from the model the trainer builds, made on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = build_model(cfg)
    state = model.state_dict()  # routing tables are non-persistent: not in checkpoints
    return ParameterCount(
        total=sum(p.numel() for p in model.parameters()),
        per_block=sum(p.numel() for p in model.blocks[0].parameters()),
        state_bytes=sum(v.numel() * 4 for v in state.values()),
    )
