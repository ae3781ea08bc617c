"""Config composition and validation: train.yaml extends the TrainConfig schema (Hydra's
ConfigStore), so every schema key is overridable, a wrong key or type is Hydra's error while
composing, and bad values fail before training, naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from dtr_scale.command_line import hydra_overrides
from dtr_scale.config import ConfigError, TrainConfig, appended_keys, resume_changes, to_train_config
from dtr_scale.configs import CONFIG_DIR
from dtr_scale.train.components import config_to_dict


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


def test_every_schema_key_is_overridable_even_where_no_yaml_file_repeats_it():
    cfg = composed("eval.at_save=true", "eval.inception=/models/inception.pth", "backend.zero_stage=3",
                   "health.spike_factor=7.5", "optimizer.grad_clip=1.0", "cluster.max_requeues=4")
    assert (cfg.eval.at_save, cfg.eval.inception, cfg.backend.zero_stage) == (True, "/models/inception.pth", 3)
    assert (cfg.health.spike_factor, cfg.optimizer.grad_clip, cfg.cluster.max_requeues) == (7.5, 1.0, 4)
    assert cfg.backend.name == "ddp"  # zero_stage is only a value until backend=deepspeed uses it


def test_the_paper_preset_takes_schema_only_keys_too():
    cfg = composed("experiment=dtr_paper/dit_l2_dtr_antuw_2m", "cluster=example_cluster", "eval.at_save=true")
    assert (cfg.model.name, cfg.steps, cfg.eval.at_save, cfg.cluster.kind, cfg.world_size) == (
        "DiT-L/2", 2_000_000, True, "slurm", 8)


def test_cluster_none_trains_in_this_process_and_null_means_the_same():
    assert composed().cluster.kind == "local"
    assert composed("cluster=none").cluster is None
    assert composed(*hydra_overrides("train", ["cluster=null"])).cluster is None
    assert composed("~cluster").cluster is None  # Hydra's own way to drop the group


def test_unknown_key_is_named():
    with pytest.raises(ConfigCompositionException, match=r"routing\.betta"):  # Hydra, while composing
        composed("routing.betta=0.5")
    with pytest.raises(ConfigError, match=r"Key 'betta' not in 'RoutingConfig' \(key: routing\.betta\)"):
        composed("+routing.betta=0.5")  # Hydra appends it; the schema check refuses it


@pytest.mark.parametrize("overrides", [(), ("experiment=dtr_paper/dit_l2_dtr_antuw_2m", "cluster=example_cluster"),
                                       ("backend=deepspeed", "++backend.deepspeed_overrides={steps_per_print: 7}")])
def test_a_composed_config_builds_what_the_schema_merge_builds(overrides):
    # to_train_config builds a config composed on the schema directly; the re-merge of its plain
    # data into the schema (the path of dicts and of configs with appended keys) gives the same
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = compose(config_name="train", overrides=["run_dir=/tmp/unused", *overrides])
    assert appended_keys(raw) == []
    assert to_train_config(raw) == to_train_config(OmegaConf.to_container(raw, resolve=True))


def test_appended_keys_are_found_at_any_depth():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = compose(config_name="train", overrides=["run_dir=/tmp/unused", "+seeed=1", "+eval.quick.sampels=5",
                                                      "+backend.deepspeed_overrides.anything=1"])
    # a dict-valued field takes any key: only the dataclasses' undeclared ones are appended
    assert sorted(appended_keys(raw)) == ["eval.quick.sampels", "seeed"]
    with pytest.raises(ConfigError, match=r"Key '(seeed|sampels)' not in '\w+'"):
        to_train_config(raw)


def test_wrong_type_is_named_by_hydra_while_composing():
    with pytest.raises(ConfigCompositionException, match=r"steps=many"):
        composed("steps=many")


@pytest.mark.parametrize("override,pattern", [
    ("routing.kind=diagonal", r"routing\.kind: got 'diagonal', expected one of none, dtr, random"),
    ("routing.beta=1.5", r"routing\.beta: got 1\.5, must be in \(0, 1\]"),
    ("weighting.kind=nash", r"weighting\.kind: got 'nash'"),
    ("diffusion.schedule=sigmoid", r"diffusion\.schedule"),
    ("model.name=DiT-M/2", r"model\.name: got 'DiT-M/2'"),
    ("model.depth=-1", r"model\.depth: got -1, must be positive"),  # once trained a DiT without blocks
    ("model.depth=0", r"model\.depth: got 0, must be positive"),
    ("model.hidden_size=0", r"model\.hidden_size: got 0, must be positive"),
    ("model.num_classes=0", r"model\.num_classes: got 0, must be positive"),
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
        [sys.executable, "-m", "dtr_scale.run", f"run_dir={tmp_path}/run", "routing.beta=0"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert run.returncode == 2
    assert "dtr-scale train: config error: routing.beta: got 0.0, must be in (0, 1]" in run.stderr
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


def test_train_run_dir_also_places_hydras_outputs_there():
    assert hydra_overrides("train", ["run_dir=runs/a", "steps=5"]) == ["hydra.run.dir=runs/a", "run_dir=runs/a",
                                                                      "steps=5"]
    assert hydra_overrides("train", ["steps=5"]) == ["steps=5"]  # a new run: runs/DATE/TIME
    assert "hydra.run.dir=runs/a" not in hydra_overrides("train", ["-m", "run_dir=runs/a"])  # sweeps: their own
    assert hydra_overrides("plan", ["run_dir=runs/a"]) == ["run_dir=runs/a"]  # planning writes nothing


def test_a_resume_refuses_what_its_checkpoints_were_not_trained_with_and_allows_the_rest():
    saved = config_to_dict(composed())
    same = config_to_dict(composed())
    assert resume_changes(saved, same) == ([], [])
    changed = config_to_dict(composed("steps=3000", "eval.every=100", "cluster.time_min=30", "logging.every=10",
                                      "checkpoint.every=100", "diffusion.cfg_scale=4.0", "world_size=4",
                                      "model.depth=6", "seed=1", "global_batch_size=128", "data.format=webdataset",
                                      "data.hflip=true", "routing.beta=0.5", "weighting=min_snr", "diffusion.schedule=cosine"))
    breaking, harmless = resume_changes(saved, changed)
    assert breaking == ["data.format: 'mds' -> 'webdataset'", "data.hflip: False -> True",
                        "diffusion.schedule: 'linear' -> 'cosine'",
                        "global_batch_size: 64 -> 128", "model.depth: 4 -> 6", "routing.beta: 0.8 -> 0.5",
                        "seed: 0 -> 1", "weighting.kind: 'ant_uw' -> 'min_snr'", "weighting.stratified: True -> False"]
    assert harmless == ["checkpoint.every: 500 -> 100",
                        "cluster.tasks_per_node: 2 -> 4", "cluster.time_min: 1440 -> 30", "diffusion.cfg_scale: 1.5 -> 4.0", "eval.every: 500 -> 100",
                        "logging.every: 50 -> 10", "steps: 2500 -> 3000", "world_size: 2 -> 4"]
