"""Fixtures for the evaluator tests: the digits prepared once, and one briefly trained tiny DiT
on them (checkpoints at steps 100, 200, 250; post-hoc EMA snapshots at each) that tests copy
before they write into it."""

from __future__ import annotations

import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from dtr_scale.config import TrainConfig, to_train_config
from dtr_scale.train.checkpoint import checkpoint_dir, checkpoint_name, read_meta
from dtr_scale.train.components import config_from_dict, config_to_dict

# --import-mode=importlib puts no test folder on sys.path; the metric tests import adm_reference.py.
sys.path.insert(0, str(Path(__file__).parent))

TRAIN_STEPS = 250


def tiny_digits_config(data_path: str, run_dir: str) -> dict:
    """A DiT with DTR small enough to learn the digits' rough shapes in ~250 steps on a CPU."""
    return {
        "model": {"name": "DiT-S/2", "input_size": 8, "in_channels": 4, "num_classes": 10,
                  "depth": 2, "hidden_size": 64, "num_heads": 4},
        "routing": {"kind": "dtr"}, "weighting": {"kind": "uniform"},
        "diffusion": {"sampling_steps": 10},
        "optimizer": {"lr": 1e-3},
        "data": {"kind": "shards", "path": data_path, "embedded": True},
        "run_dir": run_dir, "steps": TRAIN_STEPS, "global_batch_size": 64, "ema_decay": 0.9, "sample_at_end": 0,
        "checkpoint": {"every": 100, "keep_last": 5}, "logging": {"every": 50, "wandb": "disabled"},
        "eval": {"every": 200, "num_samples": 30, "batch_size": 10, "averaging": ["ema"]},
    }


@contextmanager
def single_thread():
    """Tiny models run no faster on more threads, and many times slower when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with single_thread():
        yield


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    from dtr_scale.data_prep.digits import prepare_digits

    path = tmp_path_factory.mktemp("digits") / "digits"
    with single_thread():
        prepare_digits(str(path), format="mds")
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, digits_dir):
    """RUN_DIR of the tiny run, trained once per session; read it, do not write into it."""
    from dtr_scale.train.loop import train

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    with single_thread():  # session fixtures are set up before the module's one_thread
        result = train(to_train_config(tiny_digits_config(str(digits_dir), str(run_dir))))
    assert (result.status, result.step) == ("finished", TRAIN_STEPS)
    return run_dir


@pytest.fixture
def run_copy(trained_run, tmp_path):
    """A private copy of the trained run, to evaluate into."""
    return shutil.copytree(trained_run, tmp_path / "run")


def checkpoint_of(run_dir, step: int):
    return checkpoint_dir(run_dir) / checkpoint_name(step)


@pytest.fixture
def checkpoint_at():
    """checkpoint_at(run_dir, step) -> RUN_DIR/checkpoints/step_N."""
    return checkpoint_of


@pytest.fixture
def eval_config():
    """eval_config(run_dir, **dotted_overrides) -> the run's own config with the overrides."""
    return run_config


def run_config(run_dir, **overrides) -> TrainConfig:
    """The run's own config (from its last checkpoint) with dotted overrides, e.g. eval.num_samples=10."""
    data = config_to_dict(config_from_dict(read_meta(checkpoint_of(run_dir, TRAIN_STEPS))["config"]))
    data["run_dir"] = str(run_dir)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return to_train_config(data)


@pytest.fixture
def digits_run_config():
    """digits_run_config(data_path, run_dir) -> the tiny digits run's config as a dict, to adjust."""
    return tiny_digits_config
