"""Denoising Task Routing: which channels of a DiT block each timestep uses.

Every timestep t is a task with a [C] 0/1 channel mask; the masks of all T
tasks form a table computed once at construction and indexed by each sample's
integer timestep. Nothing here holds global state, so it traces under
torch.compile like any buffer lookup.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

ROUTING_KINDS = ("none", "dtr", "random")


def active_width(channels: int, beta: float) -> int:
    # C_beta = floor(beta * C) (DTR, Sec. 3.2)
    return int(np.floor(beta * channels))


def dtr_window_starts(channels: int, num_timesteps: int = 1000, beta: float = 0.8, alpha: float = 4.0) -> np.ndarray:
    # s_t = round((t / (T-1))**alpha * (C - C_beta)), numpy's round-half-to-even (DTR released code)
    slide = channels - active_width(channels, beta)
    return np.round(np.linspace(0.0, 1.0, num_timesteps) ** alpha * slide).astype(np.int64)


def dtr_mask(channels: int, num_timesteps: int = 1000, beta: float = 0.8, alpha: float = 4.0) -> torch.Tensor:
    """The [num_timesteps, channels] 0/1 float table: m[t, c] = 1 iff s_t <= c < s_t + C_beta."""
    starts = dtr_window_starts(channels, num_timesteps, beta, alpha)[:, None]
    c = np.arange(channels)[None, :]
    inside = (c >= starts) & (c < starts + active_width(channels, beta))
    return torch.from_numpy(inside.astype(np.float32))


def random_masks(channels: int, depth: int, num_timesteps: int = 1000, beta: float = 0.8, seed: int = 0) -> torch.Tensor:
    """R-TR ablation: [depth, T, C], for each block and t an independent random subset of C_beta channels."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(depth, num_timesteps, channels, generator=generator)
    chosen = scores.topk(active_width(channels, beta), dim=-1).indices
    return torch.zeros(depth, num_timesteps, channels).scatter_(-1, chosen, 1.0)


class TaskRouting(nn.Module):
    """Holds the mask table(s) and looks up each sample's mask.

    The tables are non-persistent buffers: they are rebuilt from the config, so
    checkpoints without them (the official DiT ones) load with strict=True.
    """

    def __init__(self, kind: str, channels: int, depth: int, num_timesteps: int = 1000,
                 beta: float = 0.8, alpha: float = 4.0, seed: int = 0):
        super().__init__()
        if kind == "dtr":
            tables = dtr_mask(channels, num_timesteps, beta, alpha)[None]  # one table shared by all blocks
        elif kind == "random":
            tables = random_masks(channels, depth, num_timesteps, beta, seed)
        else:
            raise ValueError(f"TaskRouting kind must be 'dtr' or 'random', got {kind!r}")
        self.kind = kind
        self.depth = depth
        # bool keeps R-TR's per-block tables at 1 byte per entry (DiT-XL: 32 MB instead of 129 MB).
        self.register_buffer("tables", tables.bool(), persistent=False)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keep, drop) masks for each block, each [N, 1, C] in `dtype`, for integer timesteps t [N].

        drop = 1 - keep is computed here once per forward, not in every block.
        """
        keep = self.tables[:, t].to(dtype).unsqueeze(2)  # [tables, N, 1, C]
        pairs = [(k, 1 - k) for k in keep.unbind(0)]
        return [pairs[i % len(pairs)] for i in range(self.depth)]

    def extra_repr(self) -> str:
        return f"kind={self.kind}, tables={tuple(self.tables.shape)}"
