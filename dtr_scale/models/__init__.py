"""DiT backbones and Denoising Task Routing."""

from __future__ import annotations

from typing import Any

from dtr_scale.models.dit import DIT_PRESETS, DiT


def create_model(
    name: str,
    *,
    routing: str = "none",
    beta: float = 0.8,
    alpha: float = 4.0,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    class_dropout_prob: float = 0.1,
    **kwargs: Any,
) -> DiT:
    """A DiT preset ("DiT-S/2" ... "DiT-XL/8"); `depth`, `hidden_size`, `num_heads`,
    `patch_size`, `mlp_ratio` (and `routing_seed`, `num_timesteps`) override it."""
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(DIT_PRESETS)}")
    arch = {**DIT_PRESETS[name], **kwargs}
    return DiT(
        input_size=input_size, in_channels=in_channels, num_classes=num_classes, learn_sigma=learn_sigma,
        class_dropout_prob=class_dropout_prob, routing=routing, beta=beta, alpha=alpha, **arch,
    )


__all__ = ["DIT_PRESETS", "DiT", "create_model"]
