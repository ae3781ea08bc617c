"""Distribution strategies behind one small interface, so the loop is written once.

A backend owns the wrapped module, the optimizer and how both are saved:

    setup(module, ema)               wrap model + objective (and the EMA copy), build the optimizer
    forward(*inputs) -> dict         one micro-batch through the wrapped module
    micro_step(last) -> context      gradient-sync boundary for accumulation
    backward(loss)
    clip_grad_norm(max_norm) -> norm global gradient norm (inf: measure only)
    step() / skip()                  apply or drop this step's gradients
    update_ema(decay)
    save(path) / load(path)          all training state except data position and step
    full_state(which) -> dict|None   unsharded "ema" or "model" weights on rank 0
    param_groups                     the optimizer's groups (for logging)
"""

from __future__ import annotations

from dtr_scale.config import TrainConfig


def make_backend(cfg: TrainConfig, world):
    if cfg.backend.name == "deepspeed":
        from dtr_scale.train.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(cfg, world)
    from dtr_scale.train.backends.torch_dist import TorchBackend

    return TorchBackend(cfg, world)
