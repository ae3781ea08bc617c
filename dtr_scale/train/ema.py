"""Per-step exponential moving average of the model weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


def ema_pairs(ema: nn.Module, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the EMA's parameters, the model's), matched by name, taken once: walking the module tree
    every step costs a small model as much as the update itself. Buffers are fixed tables (the
    positional embedding, the routing masks) and are not averaged."""
    params = dict(model.named_parameters())
    names = [name for name, _ in ema.named_parameters()]
    if set(names) != set(params):
        raise ValueError("the EMA and the model have different parameters; build the EMA with make_ema(model)")
    return [p for _, p in ema.named_parameters()], [params[name] for name in names]


@torch.no_grad()
def update_ema(pairs: tuple[list[torch.Tensor], list[torch.Tensor]], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, one multi-tensor lerp over `ema_pairs`' lists.
    no_grad: the parameters are read as they are, without a detached view of each per step."""
    torch._foreach_lerp_(pairs[0], pairs[1], 1.0 - decay)
