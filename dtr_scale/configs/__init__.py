"""The Hydra configs shipped with the package (train.yaml, eval.yaml, plan.yaml and the config
groups), found by the commands as pkg://dtr_scale.configs; a user's --config-dir adds options beside
them (on a name both have, the packaged file wins: Hydra searches --config-dir after it).

Importing this package stores TrainConfig in Hydra's ConfigStore as `train_schema`, the schema
train.yaml extends: Hydra then knows every key and its type, shows each default in --help and
rejects a wrong key or type while composing. Hydra imports the package when it searches
pkg://dtr_scale.configs; code that composes from CONFIG_DIR imports it to get the path.
"""

from pathlib import Path

from hydra.core.config_store import ConfigStore

from dtr_scale.config import TrainConfig

CONFIG_DIR = str(Path(__file__).resolve().parent)
SCHEMA_NAME = "train_schema"  # the first entry of train.yaml's defaults list

ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)
