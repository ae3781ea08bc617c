"""Hydra's command line, as the train, eval and plan commands share it: the packaged configs
composed with key=value and group=option overrides, the subcommand's own flags beside them,
and one way to report a config a command cannot use."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from dtr_scale.config import TrainConfig

# The packaged configs; a user's --config-dir is searched first and layers on top.
HYDRA_CONFIG_PATH = "pkg://dtr_scale.configs"
NULL_CLUSTER = ("cluster=null", "cluster=None", "cluster=none")


def hydra_overrides(command: str, args: list[str]) -> list[str]:
    """The command line as Hydra gets it. `cluster=null` selects the `none` option (Hydra
    cannot set a config group to null). For train, `run_dir=RUN` also sets hydra.run.dir=RUN:
    a resumed run keeps its .hydra/ and train.log in RUN, not in a new runs/DATE/TIME."""
    out = ["cluster=none" if arg in NULL_CLUSTER else arg for arg in args]
    sweeping = "-m" in out or "--multirun" in out
    if command == "train" and not sweeping and not any(arg.startswith("hydra.run.dir=") for arg in out):
        run_dir = next((arg.split("=", 1)[1] for arg in out if arg.lstrip("+").startswith("run_dir=")), None)
        if run_dir:  # first: after a flag such as `--cfg job`, argparse would not take it as an override
            out.insert(0, f"hydra.run.dir={run_dir}")
    return out


def split_flags(parser: argparse.ArgumentParser, args: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """A subcommand's own flags (before, between or after the overrides), and the rest for
    Hydra. With --help the flags' help is printed first; Hydra's help (the config) follows."""
    if "-h" in args or "--help" in args:
        print(parser.format_help())
    return parser.parse_known_args(args)


def flag_parser(command: str) -> argparse.ArgumentParser:
    """The parser a Hydra subcommand's own flags are added to (no -h: Hydra answers it)."""
    return argparse.ArgumentParser(prog=f"dtr-scale {command}", add_help=False, allow_abbrev=False,
                                   usage=f"dtr-scale {command} [flags] [key=value ...] [group=option ...]")


def run_hydra(command: str, config_name: str, task: Callable[[DictConfig], None], args: list[str]) -> None:
    """Compose configs/<config_name>.yaml with the overrides in `args` and call task(config);
    --help, --cfg job, --config-dir and -m are Hydra's."""
    import hydra

    sys.argv = [f"dtr-scale {command}", *hydra_overrides(command, args)]
    hydra.main(config_path=HYDRA_CONFIG_PATH, config_name=config_name, version_base="1.3")(task)()


def exit_config_error(command: str, err: Exception) -> NoReturn:
    """Every subcommand reports a config it cannot use the same way: the reason on stderr, status 2."""
    print(f"dtr-scale {command}: config error: {err}", file=sys.stderr)
    sys.exit(2)


def config_or_exit(raw: DictConfig, command: str) -> TrainConfig:
    """The typed config, or exit_config_error."""
    from dtr_scale.config import ConfigError, to_train_config

    try:
        return to_train_config(raw)
    except ConfigError as err:
        exit_config_error(command, err)
