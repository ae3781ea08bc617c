import pytest

from dtr_scale.config import to_train_config


@pytest.fixture
def tiny_config(tmp_path):
    """A DiT with DTR + ANT-UW small enough to train in seconds on a CPU."""

    def make(**overrides):
        base = {
            "model": {"name": "DiT-S/2", "input_size": 8, "in_channels": 4, "num_classes": 4,
                      "depth": 2, "hidden_size": 64, "num_heads": 4},
            "routing": {"kind": "dtr"},
            "weighting": {"kind": "ant_uw", "num_intervals": 4},
            "diffusion": {"sampling_steps": 25},
            "optimizer": {"lr": 1e-3},
            "data": {"kind": "synthetic", "num_samples": 256},
            "run_dir": str(tmp_path / "run"), "steps": 20, "global_batch_size": 16,
            "ema_decay": 0.9, "sample_at_end": 0,
            "checkpoint": {"every": 10, "keep_last": 5}, "logging": {"every": 5, "wandb": "disabled"},
        }
        for key, value in overrides.items():
            node = base
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return to_train_config(base)

    return make
