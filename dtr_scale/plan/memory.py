"""GPU memory one training process needs, by part, for each backend.

Training state is counted per parameter as the backends hold it (fp32 weights,
gradients and AdamW moments; DDP's gradient buckets; DeepSpeed's fp32 optimizer
partition and reduce bucket; the EMA and post-hoc EMA copies, sharded only under
FSDP), activations from what autograd saves in a DiT block. ANT-Nash and PCGrad hold
the k per-interval gradients at once (train/mtl.py), sharded only under FSDP.
"""

from __future__ import annotations

from dataclasses import dataclass

from dtr_scale.config import GRADIENT_WEIGHTINGS, TrainConfig
from dtr_scale.plan.model_cost import DiTShape, ParameterCount

FP32 = 4
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements: DeepSpeed's default reduce_bucket_size (ZeRO 1/2)


@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, float]  # bytes per GPU

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def block_activation_bytes_per_token(s: DiTShape, precision: str) -> int:
    # Saved for backward by one block per token (counted with autograd saved-tensor hooks on this DiT with
    # SDPA attention): 12 tensors C wide (norm inputs and outputs, modulated inputs, q/k/v, attention output,
    # projection input, the two gated branch outputs) and 2 tensors mlp-hidden wide (fc1 out, GELU out).
    # Under bf16 autocast the 4 LayerNorm inputs and outputs stay fp32, the rest is bf16.
    c, m = s.hidden, s.mlp_hidden
    if precision == "bf16":
        return FP32 * 4 * c + 2 * (8 * c + 2 * m)
    return FP32 * (12 * c + 2 * m)


def activation_bytes_per_image(s: DiTShape, precision: str, checkpointed: bool) -> int:
    """Activations of the DiT blocks for one image; with activation checkpointing only each block's
    fp32 input is kept, plus one block's activations while it is recomputed."""
    block = s.tokens * block_activation_bytes_per_token(s, precision)
    if checkpointed:
        return s.depth * s.tokens * s.hidden * FP32 + block
    return s.depth * block


def training_state_bytes(cfg: TrainConfig, params: ParameterCount) -> dict[str, float]:
    """Weights, gradients, optimizer, EMA and post-hoc EMA bytes on one GPU, by backend."""
    n, p, b = cfg.world_size, params.total, cfg.backend  # one process shards nothing: n = 1
    fsdp = b.name == "fsdp"
    zero = b.zero_stage if b.name == "deepspeed" else 0
    phema = len(cfg.phema_stds)
    parts = {
        "weights fp32": FP32 * p / (n if fsdp or zero == 3 else 1),
        "gradients fp32": FP32 * p / (n if fsdp or zero >= 2 else 1),
        "AdamW moments": 2 * FP32 * p / (n if fsdp or zero else 1),
        "EMA": params.state_bytes / (n if fsdp else 1),
        f"post-hoc EMA x{phema}": phema * params.state_bytes / (n if fsdp else 1),
    }
    if b.name == "ddp" and n > 1:
        parts["DDP gradient buckets"] = FP32 * p
    if zero:
        parts["DeepSpeed fp32 partition"] = FP32 * p / n
    if zero in (1, 2):
        parts["DeepSpeed reduce bucket"] = FP32 * min(p, DEEPSPEED_REDUCE_BUCKET)
    if cfg.weighting.kind in GRADIENT_WEIGHTINGS:
        k = cfg.weighting.num_intervals
        parts[f"{k} interval gradients fp32 ({cfg.weighting.kind})"] = k * FP32 * p / (n if fsdp else 1)
    if (fsdp or zero == 3) and n > 1:
        gathered = 2 if fsdp and b.precision == "bf16" else FP32  # FSDP casts gathered params to bf16
        parts["gathered blocks (2 params + 1 grads)"] = params.per_block * (2 * gathered + FP32)
    return parts


def routing_table_bytes(cfg: TrainConfig, s: DiTShape) -> int:
    # DTR: one [T, C] mask table shared by all blocks; R-TR: one per block (models/routing.py).
    tables = {"none": 0, "dtr": 1, "random": s.depth}[cfg.routing.kind]
    return tables * cfg.diffusion.num_timesteps * s.hidden * FP32


def estimate_memory(cfg: TrainConfig, s: DiTShape, params: ParameterCount, reserve_gib: float) -> MemoryEstimate:
    act = activation_bytes_per_image(s, cfg.backend.precision, cfg.backend.activation_checkpointing)
    parts = training_state_bytes(cfg, params)
    parts["routing tables"] = routing_table_bytes(cfg, s)
    parts[f"activations ({cfg.micro_batch_size} images)"] = cfg.micro_batch_size * act
    if reserve_gib:
        parts["CUDA context, workspaces, fragmentation"] = reserve_gib * 2**30
    return MemoryEstimate(parts)
