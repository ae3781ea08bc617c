"""Config composition and validation: bad settings fail before training, naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from dtr_scale.config import ConfigError, TrainConfig, to_train_config
from dtr_scale.train.cli import CONFIG_DIR


def composed(*overrides: str) -> TrainConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = compose(config_name="train", overrides=["run_dir=/tmp/unused", *overrides])
    return to_train_config(raw)


def test_issue_example_override_line_composes():
    cfg = composed("model=dit_l2", "routing=dtr", "routing.beta=0.8", "weighting=ant_uw",
                   "weighting.num_intervals=8", "global_batch_size=256")
    assert (cfg.model.name, cfg.model.input_size, cfg.model.num_classes) == ("DiT-L/2", 32, 1000)
    assert (cfg.routing.kind, cfg.routing.beta, cfg.routing.alpha) == ("dtr", 0.8, 4.0)
    assert (cfg.weighting.kind, cfg.weighting.num_intervals, cfg.weighting.uw_lr) == ("ant_uw", 8, 0.025)
    assert cfg.weighting.stratify


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"routing\.betta"):
        composed("+routing.betta=0.5")


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"steps"):
        composed("steps=many")


@pytest.mark.parametrize("override,pattern", [
    ("routing.kind=diagonal", r"routing\.kind: got 'diagonal', expected one of none, dtr, random"),
    ("routing.beta=1.5", r"routing\.beta: got 1\.5, must be in \(0, 1\]"),
    ("weighting.kind=nash", r"weighting\.kind: got 'nash'"),
    ("diffusion.schedule=sigmoid", r"diffusion\.schedule"),
    ("model.name=DiT-M/2", r"model\.name: got 'DiT-M/2'"),
])
def test_bad_values_are_named(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        composed(override)


def test_batch_not_divisible_by_intervals():
    with pytest.raises(ConfigError, match=r"per-rank batch 36 .* not divisible by weighting\.num_intervals=8"):
        composed("global_batch_size=72", "world_size=2", "weighting.num_intervals=8")
    composed("global_batch_size=72", "world_size=2", "weighting=uniform")  # fine without stratification


def test_cli_rejects_a_bad_override_before_training(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "dtr_scale.train.cli", f"run_dir={tmp_path}/run", "routing.beta=0"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2
    assert "routing.beta: got 0.0, must be in (0, 1]" in run.stdout + run.stderr
    assert not (Path(tmp_path) / "run" / "checkpoints").exists()


def test_backend_settings_are_checked_before_any_process_starts():
    with pytest.raises(ConfigError, match=r"backend\.name: got 'horovod'"):
        composed("backend.name=horovod")
    with pytest.raises(ConfigError, match=r"backend\.zero_stage: got 4"):
        composed("backend=deepspeed", "backend.zero_stage=4")
    with pytest.raises(ConfigError, match=r"64 is not divisible by world_size=3"):
        composed("global_batch_size=64", "world_size=3", "weighting=uniform")
    with pytest.raises(ConfigError, match=r"not divisible by world_size x backend\.grad_accum = 2 x 3"):
        composed("global_batch_size=64", "world_size=2", "backend.grad_accum=3", "weighting=uniform")
    with pytest.raises(ConfigError, match=r"phema_stds: .*ZeRO-3"):
        composed("backend=deepspeed", "backend.zero_stage=3")
