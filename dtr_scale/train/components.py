"""Builders that turn the config into the pieces of a run: model, objective,
optimizer, data. Each is a plain function of the config. And the module the
backends wrap: the model and its training objective as one."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torch import nn

from dtr_scale.config import TrainConfig, to_train_config
from dtr_scale.data.synthetic import SyntheticLatents, SyntheticLoader
from dtr_scale.diffusion.gaussian import GaussianDiffusion
from dtr_scale.diffusion.objective import TrainingObjective
from dtr_scale.models import DiT, create_model
from dtr_scale.models.weights import load_dit_weights


class DiffusionTrainModule(nn.Module):
    """Model + objective as one module, so data-parallel wrappers also reduce the
    gradients of the objective's own parameters (ANT-UW)."""

    def __init__(self, model: nn.Module, objective: TrainingObjective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x0, y, t, noise, drop) -> dict[str, torch.Tensor]:
        out = self.objective(self.model, x0, y, t, noise, force_drop_ids=drop)
        return {"loss": out.loss, "mse": out.mse.mean(), "vb": out.vb.mean(),
                "interval_losses": out.interval_losses, "interval_counts": out.interval_counts}


def build_model(cfg: TrainConfig, *, load_init: bool = True) -> DiT:
    """The configured DiT; with model.init_from and `load_init`, its weights come from that file
    (the trainer passes load_init=False when it resumes: the checkpoint's weights come next)."""
    m, r = cfg.model, cfg.routing
    model = create_model(
        m.name, routing=r.kind, beta=r.beta, alpha=r.alpha, routing_seed=r.seed,
        num_timesteps=cfg.diffusion.num_timesteps, input_size=m.input_size, in_channels=m.in_channels,
        num_classes=m.num_classes, learn_sigma=m.learn_sigma, class_dropout_prob=m.class_dropout_prob,
        **m.overrides(),
    )
    if load_init and m.init_from:
        load_dit_weights(model, m.init_from)
    return model


def build_diffusion(cfg: TrainConfig) -> GaussianDiffusion:
    d = cfg.diffusion
    return GaussianDiffusion.from_schedule(d.schedule, d.num_timesteps, d.learn_sigma, d.prediction)


def build_objective(cfg: TrainConfig) -> TrainingObjective:
    return TrainingObjective(build_diffusion(cfg), cfg.weighting)


def build_optimizer(model: nn.Module, objective: TrainingObjective, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the model, with ANT-UW's log-variances in their own group (lr 0.025, wd 0)."""
    o = cfg.optimizer
    groups = [{"params": list(model.parameters()), "lr": o.lr, "weight_decay": o.weight_decay, "name": "model"}]
    if objective.uw is not None:
        groups.append({"params": list(objective.uw.parameters()), "lr": cfg.weighting.uw_lr,
                       "weight_decay": cfg.weighting.uw_weight_decay, "name": "uw"})
    # fused AdamW runs on CPUs too (torch >= 2.4), so the same switch is testable there
    return torch.optim.AdamW(groups, betas=tuple(o.betas), eps=o.eps, fused=cfg.backend.fused_adamw or None)


def build_loader(cfg: TrainConfig, rank: int, world_size: int):
    """A per-rank batch iterator with state_dict/load_state_dict (its position in the data)."""
    if cfg.data.kind == "synthetic":
        shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
        dataset = SyntheticLatents(cfg.data.num_samples, cfg.model.num_classes, shape, cfg.data.noise_std, cfg.seed)
        return SyntheticLoader(dataset, global_batch_size=cfg.global_batch_size, rank=rank,
                               world_size=world_size, seed=cfg.seed)
    from dtr_scale.data.loader import build_shard_loader

    return build_shard_loader(cfg.data.path, format=cfg.data.format, global_batch_size=cfg.global_batch_size,
                              rank=rank, world_size=world_size, seed=cfg.seed, num_workers=cfg.data.num_workers,
                              hflip=cfg.data.hflip, remote=cfg.data.remote)


def config_to_dict(cfg: TrainConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def config_from_dict(data: dict) -> TrainConfig:
    return to_train_config(data)
