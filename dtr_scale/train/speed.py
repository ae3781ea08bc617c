"""GPU speed switches applied to a DiT before it is wrapped: the same code runs on
CPU with all of them off."""

from __future__ import annotations

import contextlib

import torch
from torch.distributed._composable import checkpoint as activation_checkpoint

from dtr_scale.config import BackendConfig
from dtr_scale.models import DiT


def apply_speed_switches(model: DiT, cfg: BackendConfig) -> None:
    """Activation checkpointing and torch.compile per DiT block, in place.

    Both keep parameter names unchanged (composable checkpoint, Module.compile),
    so checkpoints stay compatible with the plain model.
    """
    if cfg.tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for block in model.blocks:
        if cfg.activation_checkpointing:
            activation_checkpoint(block)
        if cfg.compile:
            block.compile()


def autocast(cfg: BackendConfig, device: str) -> contextlib.AbstractContextManager:
    """bf16 autocast around the forward when asked; weights and optimizer stay fp32."""
    if cfg.precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()
