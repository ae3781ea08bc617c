"""Per-step exponential moving average of the model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    # ema <- decay * ema + (1 - decay) * model, over parameters (buffers are fixed tables)
    # no_grad: the parameters are read as they are, without a detached view of each per step
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)
