"""Configs the plan tests build: consistent GPU runs, and the presets as Hydra composes them."""

from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir

from dtr_scale.config import (BackendConfig, CheckpointConfig, EvalConfig, ModelConfig, TrainConfig,
                              WeightingConfig, to_train_config)
from dtr_scale.configs import CONFIG_DIR


def gpu_run(model: str | ModelConfig = "DiT-XL/2", backend: str = "ddp", world_size: int = 8,
            global_batch_size: int = 256, precision: str = "bf16", **changes) -> TrainConfig:
    """A consistent GPU training config: checkpoints and evaluation every 50K of 400K steps."""
    fields = dict(
        model=ModelConfig(name=model) if isinstance(model, str) else model, weighting=WeightingConfig(kind="uniform"),
        backend=BackendConfig(name=backend, precision=precision),
        checkpoint=CheckpointConfig(every=50_000), eval=EvalConfig(every=50_000),
        steps=400_000, global_batch_size=global_batch_size, world_size=world_size, device="cuda",
    )
    return TrainConfig(**{**fields, **changes})


def experiment_override(name: str) -> str:
    # `experiment=` where train.yaml's defaults list the group (`- experiment: null`), `+experiment=` otherwise
    defaults = yaml.safe_load((Path(CONFIG_DIR) / "train.yaml").read_text())["defaults"]
    listed = any(isinstance(d, dict) and "experiment" in d for d in defaults)
    return f"{'' if listed else '+'}experiment={name}"


def compose_experiment(name: str, *overrides: str) -> TrainConfig:
    """A preset from configs/experiment through Hydra, as `dtr-scale plan experiment=NAME ...` composes it."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = compose("train", overrides=[experiment_override(name), "run_dir=/tmp/unused", *overrides])
    return to_train_config(raw)
