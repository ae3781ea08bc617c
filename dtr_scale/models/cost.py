"""What one DiT forward pass costs per image: its shape and analytic multiply-accumulates
(MACs; FLOPs = 2 x MACs), and the model FLOPs utilisation a measured training rate means.

The MAC count is written out layer by layer from SPEC section 1 (the DiT architecture), the
way the DiT paper counts its "Gflops" (Table 1: 118.6 for DiT-XL/2 at 256 px, which are MACs):
every Linear/Conv as in x out per token, attention as two T x T x C products, embedding
lookups, norms and elementwise ops as zero. The planner (plan.model_cost) and the training
loop's MFU both count with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dtr_scale.config import ModelConfig
from dtr_scale.models.dit import DIT_PRESETS

FORWARDS_PER_TRAINING_STEP = 3  # backward costs about two forwards (Kaplan et al. 2020, C = 6N per token)
FREQUENCY_EMBEDDING_SIZE = 256  # the timestep embedder's sinusoid width (DiT's TimestepEmbedder)


@dataclass(frozen=True)
class DiTShape:
    depth: int
    hidden: int
    heads: int
    patch: int
    input_size: int
    in_channels: int
    out_channels: int
    mlp_hidden: int

    @property
    def tokens(self) -> int:
        return (self.input_size // self.patch) ** 2


def dit_shape(model: ModelConfig) -> DiTShape:
    """The architecture a model config builds: its preset with the config's overrides."""
    arch = {"mlp_ratio": 4.0, **DIT_PRESETS[model.name], **model.overrides()}
    return DiTShape(depth=arch["depth"], hidden=arch["hidden_size"], heads=arch["num_heads"],
                    patch=arch["patch_size"], input_size=model.input_size, in_channels=model.in_channels,
                    out_channels=model.in_channels * (2 if model.learn_sigma else 1),
                    mlp_hidden=int(arch["hidden_size"] * arch["mlp_ratio"]))


def block_macs(s: DiTShape) -> dict[str, int]:
    # One adaLN-Zero block (SPEC 1): modulation Linear(C, 6C) on c, then attention and MLP over T tokens.
    t, c = s.tokens, s.hidden
    return {
        "adaLN modulation": c * 6 * c,
        "qkv": t * c * 3 * c,
        "attention scores (QK^T)": t * t * c,
        "attention weighted sum (AV)": t * t * c,
        "attention proj": t * c * c,
        "mlp": 2 * t * c * s.mlp_hidden,
    }


def forward_macs_breakdown(s: DiTShape) -> dict[str, int]:
    """MACs of one image's forward pass, by part (embedding lookups are free)."""
    t, c, p = s.tokens, s.hidden, s.patch
    per_block = sum(block_macs(s).values())
    return {
        "patch embed": t * s.in_channels * p * p * c,
        "timestep embedder": FREQUENCY_EMBEDDING_SIZE * c + c * c,
        "label embedder": 0,
        f"{s.depth} blocks": s.depth * per_block,
        "final layer": c * 2 * c + t * c * p * p * s.out_channels,
    }


def forward_macs(s: DiTShape) -> int:
    return sum(forward_macs_breakdown(s).values())


def model_flops_utilization(images_per_s: float, forward_macs: int, peak_tflops: float) -> float:
    # MFU = images/s x 3 forwards x 2 FLOPs per MAC x forward MACs per image / peak FLOP/s
    return images_per_s * FORWARDS_PER_TRAINING_STEP * 2 * forward_macs / (peak_tflops * 1e12)
