"""Hydra's command line, as the train, eval and plan commands share it: the packaged configs
composed with key=value and group=option overrides, the subcommand's own flags beside them,
and one way to report what went wrong.

Exit status, for every subcommand: 0 done; 1 a failure while working (a crash, a failed job);
2 a usage or config error, found before anything was written or submitted. Either failure is one
line on stderr, `dtr-scale COMMAND: config error: ...` or `dtr-scale COMMAND: error: ...`, naming
the key or file and what to do; the traceback only with --verbose (or HYDRA_FULL_ERROR=1)."""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import string
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from hydra._internal.hydra import Hydra
    from omegaconf import DictConfig

    from dtr_scale.config import TrainConfig

# The packaged configs. A user's --config-dir adds options beside them; on a name both have, the
# package's wins (hydra.main's search path puts --config-dir after it).
HYDRA_CONFIG_PATH = "pkg://dtr_scale.configs"
NULL_CLUSTER = ("cluster=null", "cluster=None", "cluster=none")
VERBOSE_FLAG = "--verbose"
# Hydra's own switch for full tracebacks; --verbose sets the same, so one switch serves both.
FULL_ERROR_ENV = "HYDRA_FULL_ERROR"


def hydra_overrides(command: str, args: list[str]) -> list[str]:
    """The command line as Hydra gets it. `cluster=null` selects the `none` option (Hydra
    cannot set a config group to null). For train, `run_dir=RUN` also sets hydra.run.dir=RUN:
    a resumed run keeps its .hydra/ and train.log in RUN, not in a new runs/DATE/TIME."""
    out = ["cluster=none" if arg in NULL_CLUSTER else arg for arg in args]
    sweeping = "-m" in out or "--multirun" in out
    if command == "train" and not sweeping and not any(arg.startswith("hydra.run.dir=") for arg in out):
        at = next((i for i, arg in enumerate(out) if arg.lstrip("+").startswith("run_dir=")), None)
        if at is not None and (run_dir := out[at].split("=", 1)[1]):
            # beside it: Hydra's argparse takes the overrides as one run of words, which a flag such as --cfg ends
            out.insert(at, f"hydra.run.dir={run_dir}")
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


def take_verbose(args: list[str]) -> tuple[bool, list[str]]:
    """(whether tracebacks are wanted: --verbose or HYDRA_FULL_ERROR=1, args without --verbose)."""
    rest = [arg for arg in args if arg != VERBOSE_FLAG]
    return len(rest) < len(args) or os.environ.get(FULL_ERROR_ENV) == "1", rest


def one_line(err: BaseException | str) -> str:
    """An error message on one line (Hydra's and OmegaConf's span several, and Hydra's end with
    its config search path, which tells a user nothing)."""
    lines = []
    for line in str(err).splitlines():
        if line.startswith("Config search path"):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines) or type(err).__name__


def exit_config_error(command: str, err: BaseException | str) -> NoReturn:
    """Every subcommand reports a config it cannot use the same way: one line on stderr (one per
    problem where a check found several), status 2."""
    for problem in getattr(err, "problems", None) or [err]:
        print(f"dtr-scale {command}: config error: {one_line(problem)}", file=sys.stderr)
    sys.exit(2)


def _traceback_to_log_files(err: BaseException) -> list[str]:
    """Write err's traceback to the log files open now (a run's train.log), so a crash deep in a
    long run keeps its traceback without printing it; returns those files."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    record = logging.LogRecord("dtr_scale", logging.ERROR, __file__, 0, "%s", (one_line(err),),
                               (type(err), err, err.__traceback__))
    for handler in files:
        handler.handle(record)
    return [handler.baseFilename for handler in files]


def exit_failure(command: str, err: BaseException) -> NoReturn:
    """A failure while working: the exception on one line, status 1."""
    files = _traceback_to_log_files(err)
    where = f"traceback in {', '.join(files)}; " if files else ""
    print(f"dtr-scale {command}: error: {type(err).__name__}: {one_line(err)} ({where}rerun with {VERBOSE_FLAG} "
          f"to print it)", file=sys.stderr)
    sys.exit(1)


@contextlib.contextmanager
def errors_reported(command: str, verbose: bool) -> Iterator[None]:
    """The exit-status convention around a command's work: a ConfigError exits 2, any other
    exception 1, each as one line; with `verbose` the exception goes on, traceback and all."""
    try:
        yield
    except Exception as err:
        if verbose:
            raise
        from dtr_scale.config import ConfigError

        if isinstance(err, ConfigError):
            exit_config_error(command, err)
        exit_failure(command, err)


def model_group_option(name: str) -> str:
    """The model group's option for a DiT size name: DiT-XL/2 -> dit_xl2."""
    return name.lower().replace("-", "_").replace("/", "")


def refuse_model_name_alone(args: list[str]) -> None:
    """DiT's `--model DiT-XL/2` habit: `model.name=DiT-XL/2` without `model=...` would rename the
    default model (model=tiny) and keep its depth, width and 8 x 8 latents. A preset has one
    spelling, the model group, so refuse it and name the option that means what was typed."""
    from dtr_scale.config import ConfigError

    names = [arg.split("=", 1)[1] for arg in args if arg.lstrip("+").startswith("model.name=")]
    if not names or any(arg.startswith("model=") for arg in args):
        return
    option = model_group_option(names[-1])
    available = sorted(p.stem for p in (Path(__file__).parent / "configs" / "model").glob("*.yaml"))
    pick = (f"select the preset with model={option} instead" if option in available else
            f"select a preset with model=NAME (one of {', '.join(available)}) and set model.name, "
            f"model.patch_size, ... on top of it")
    raise ConfigError(f"model.name={names[-1]}: the name alone keeps the default model group's depth, width "
                      f"and latent size (model=tiny); {pick}")


@contextlib.contextmanager
def _full_error(on: bool) -> Iterator[None]:
    """HYDRA_FULL_ERROR=1 inside (unset with on=False); as it was after."""
    before = os.environ.get(FULL_ERROR_ENV)
    if on:
        os.environ[FULL_ERROR_ENV] = "1"
    else:
        os.environ.pop(FULL_ERROR_ENV, None)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(FULL_ERROR_ENV, None)
        else:
            os.environ[FULL_ERROR_ENV] = before


def config_groups(roots: list[Path]) -> str:
    """Hydra's $APP_CONFIG_GROUPS, one `group: option, ...` line per folder of YAML files under
    `roots`. Read from the folders: Hydra's own listing copies its config repository once per
    group, 2 of the 2.5 s `--help` took."""
    groups: dict[str, set[str]] = {}
    for root in roots:
        for path in root.rglob("*.yaml"):
            group = path.parent.relative_to(root).as_posix()
            if group != ".":
                groups.setdefault(group, set()).add(path.stem)
    return "".join(f"{group}: {', '.join(sorted(options))}\n" for group, options in sorted(groups.items()))


def hydra_args(overrides: list[str]) -> argparse.Namespace:
    """The command line parsed as hydra.main parses it (its flags, and the overrides)."""
    from hydra._internal.utils import get_args_parser  # hydra.main's own parser: no public one

    return get_args_parser().parse_args(overrides)


# Hydra's flags answered by run_once; with any other (-m, --info, --hydra-help, -cn, ...) hydra.main runs.
RUN_ONCE_FLAGS = ("overrides", "help", "cfg", "resolve", "package", "run", "config_dir")


def runs_once(args: argparse.Namespace) -> bool:
    """A single run, --help or --cfg, each composing the config once (run_once)."""
    others = {key for key, value in vars(args).items() if value and key not in RUN_ONCE_FLAGS}
    if args.help:  # hydra.main answers --help before looking at the other flags
        return not others & {"config_name", "config_path"}
    if any(override.startswith("hydra.mode=") for override in args.overrides):
        return False  # hydra.mode=MULTIRUN is -m spelled as an override
    # --run with --cfg, or --resolve without --cfg: hydra.main reports them
    return not others and not (args.run and args.cfg) and not (args.resolve and args.cfg is None)


def main_hydra(config_name: str, config_dir: str | None) -> Hydra:
    """Hydra's application object with hydra.main's search path: the packaged configs, then a user's
    --config-dir (hydra/_internal/utils.py: _run_hydra). hydra-core has no public API for a run
    with its run directory, callbacks and job logging, so this is hydra._internal (pinned <1.4)."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.errors import SearchPathException

    version.setbase("1.3")
    search_path = create_config_search_path(HYDRA_CONFIG_PATH)
    if config_dir is not None:
        absolute = os.path.abspath(config_dir)
        if not os.path.isdir(absolute):
            raise SearchPathException(f"Additional config directory '{absolute}' not found")
        search_path.prepend(provider="command-line", path=f"file://{absolute}",
                            anchor=SearchPathQuery(provider="schema"))
    return Hydra.create_main_hydra2(task_name=config_name, config_search_path=search_path)


def print_help(app: Hydra, config_name: str, args: argparse.Namespace) -> None:
    """What Hydra's --help prints (the config's hydra.help template: groups, composed config),
    with the group listing above, in a fraction of the time."""
    from hydra.types import RunMode
    from omegaconf import OmegaConf, open_dict

    cfg = app.compose_config(config_name=config_name, overrides=args.overrides, run_mode=RunMode.RUN)
    template = string.Template(cfg.hydra.help.template)
    with open_dict(cfg):
        del cfg["hydra"]
    roots = [Path(__file__).parent / "configs", *([Path(args.config_dir).resolve()] if args.config_dir else [])]
    print(template.safe_substitute(APP_CONFIG_GROUPS=config_groups(roots), CONFIG=OmegaConf.to_yaml(cfg),
                                   FLAGS_HELP="", HYDRA_CONFIG_GROUPS=""))


def run_once(config_name: str, task: Callable[[DictConfig], None], args: argparse.Namespace) -> None:
    """--help, --cfg, or a single run, as hydra.main does each (run directory, .hydra/, job logging,
    callbacks) with the config composed once: before a run hydra.main composes it a first time only to
    read hydra.mode, which no config here sets (hydra/_internal/utils.py: _run_hydra, Hydra.get_mode)."""
    from hydra.core.global_hydra import GlobalHydra

    app = main_hydra(config_name, args.config_dir)
    try:
        if args.help:
            print_help(app, config_name, args)
        elif args.cfg:
            app.show_cfg(config_name=config_name, overrides=args.overrides, cfg_type=args.cfg, package=args.package,
                         resolve=args.resolve)
        else:  # hydra.mode=RUN: what hydra.main adds when the config names no mode, saved with the run
            app.run(config_name=config_name, task_function=task, overrides=[*args.overrides, "hydra.mode=RUN"])
    finally:
        GlobalHydra.instance().clear()


def run_hydra(command: str, config_name: str, task: Callable[[DictConfig], None], args: list[str]) -> None:
    """Compose configs/<config_name>.yaml with the overrides in `args` and call task(config);
    --help, --cfg job, --config-dir and -m are Hydra's. Errors follow the module's convention:
    what Hydra raises while composing (or a launch check in a Hydra callback) is a config error,
    what the task raises a failure."""
    verbose, args = take_verbose(args)
    with errors_reported(command, verbose):
        refuse_model_name_alone(args)
    overrides = hydra_overrides(command, args)
    sys.argv = [f"dtr-scale {command}", *overrides]  # argparse's usage line, and hydra.main's command line
    parsed = hydra_args(overrides)

    @functools.wraps(task)
    def reported(raw: DictConfig) -> None:
        # Jobs and processes the task starts inherit HYDRA_FULL_ERROR only if the user set it.
        with _full_error(verbose), errors_reported(command, verbose):
            task(raw)

    # Hydra prints its own errors on several lines and exits 1, unless HYDRA_FULL_ERROR asks it
    # to raise: then it raises, and the error is reported here like any other config error.
    with _full_error(True):
        try:
            if runs_once(parsed):
                run_once(config_name, reported, parsed)
            else:
                import hydra

                hydra.main(config_path=HYDRA_CONFIG_PATH, config_name=config_name, version_base="1.3")(reported)()
        except Exception as err:
            _exit_hydra_error(command, err, verbose)


def _exit_hydra_error(command: str, err: Exception, verbose: bool) -> NoReturn:
    """What Hydra raises while composing is a config error (with --verbose: raised on)."""
    if verbose:
        raise err
    exit_config_error(command, f"{one_line(err)} (`dtr-scale {command} --help` lists the groups and keys)")


def config_or_exit(raw: DictConfig, command: str) -> TrainConfig:
    """The typed config, or exit_config_error."""
    from dtr_scale.config import ConfigError, to_train_config

    try:
        return to_train_config(raw)
    except ConfigError as err:
        exit_config_error(command, err)
