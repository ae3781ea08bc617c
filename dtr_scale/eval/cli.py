"""`dtr-scale eval`: score a run's checkpoints, one, all that are due, or as they appear.

    dtr-scale eval run_dir=RUN                                  every due checkpoint there now, and the newest
    dtr-scale eval run_dir=RUN --checkpoint 2000                that one only (a step, or a directory)
    dtr-scale eval run_dir=RUN --watch                          follow the run until training has finished
    dtr-scale eval run_dir=RUN --watch --submit                 one submitit job per checkpoint (its cluster)
    dtr-scale eval run_dir=RUN eval.averaging=[ema,phema:0.10] diffusion.cfg_scale=4.0

The settings are the run's own (from its newest checkpoint, else the config Hydra saved at
its start). The command line is Hydra's, as for `dtr-scale train` (configs/eval.yaml): its
key=value and group=option overrides are composed and checked like train's, and the keys and
groups they name replace the run's values. The table (RUN/eval/results.md) and the plot
(results.png) are rewritten at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from dtr_scale.command_line import exit_config_error, flag_parser, run_hydra, split_flags
from dtr_scale.config import ConfigError, TrainConfig, to_train_config

# The evaluator, the run's checkpoints and torch are imported once a run is evaluated: --help,
# --cfg job and a config error answer without them.


def named_values(composed: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """The part of `composed` that the command line's overrides name: a key=value's key, or a
    group=option's whole group (unresolved, so that ${world_size} means the run's)."""
    plain = OmegaConf.to_container(composed, resolve=False)
    named = OmegaConf.create()
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if key.startswith("hydra"):
            continue
        node: Any = plain
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"{key}: not a setting of a run (an experiment preset picks a training run's "
                                  "settings); evaluation takes the run's own, with keys and groups on top")
            node = node[part]
        OmegaConf.update(named, key, node, merge=False)
    return OmegaConf.to_container(named, resolve=False)


def eval_config(composed: DictConfig, overrides: list[str]) -> TrainConfig:
    """The run's own config, with what the overrides name taken from `composed` (the config
    Hydra composed with them); run_dir=RUN is required."""
    named = named_values(composed, overrides)
    if not named.get("run_dir"):
        raise ConfigError("run_dir: name the run to evaluate, e.g. `dtr-scale eval run_dir=runs/my_run`")
    from dtr_scale.eval.saved_config import saved_run_config  # reads checkpoints with torch

    merged = OmegaConf.merge(saved_run_config(Path(named["run_dir"])), named)
    return to_train_config(OmegaConf.to_container(merged, resolve=True))


def main(argv: list[str] | None = None) -> None:
    parser = flag_parser("eval")
    parser.add_argument("--checkpoint", help="evaluate this checkpoint only: a step number or a directory")
    parser.add_argument("--watch", action="store_true", help="follow the run until training has finished")
    parser.add_argument("--submit", action="store_true",
                        help="evaluate in submitit jobs on the run's cluster (local processes without one)")
    parser.add_argument("--poll-s", type=float, default=30.0, help="--watch: seconds between looks at the run")
    parser.add_argument("--retry-failed", action="store_true", help="evaluate again the items whose last attempt failed")
    parser.add_argument("--weights", help="evaluate this weights file instead (.pt or .safetensors with the official "
                        "DiT names) as the model named by model=...; results in run_dir=OUT")
    parser.add_argument("--autoencoder", help="--weights: the autoencoder that decodes the samples (sd-vae-ft-ema, "
                        "pixel, ...); default: the one data.path's shards were encoded with")
    args, overrides = split_flags(parser, sys.argv[1:] if argv is None else argv)
    run_hydra("eval", "eval", lambda raw: evaluate_command(raw, args), overrides)


def evaluate_command(raw: DictConfig, args: argparse.Namespace) -> None:
    if args.weights:  # a weights file is scored as the config names it, not with a run's saved config
        from dtr_scale.eval.released import evaluate_weights_command
        from dtr_scale.eval.settings import EvaluationError
        from dtr_scale.models.weights import WeightsFileError

        try:
            evaluate_weights_command(to_train_config(raw), args.weights, args.autoencoder)
        except (ConfigError, FileNotFoundError, WeightsFileError) as err:  # found before anything is sampled
            exit_config_error("eval", err)
        except (EvaluationError, ValueError) as err:
            sys.exit(f"dtr-scale eval: {err}")
        return
    try:  # what is refused before anything is sampled or written: a config error (exit 2)
        cfg = eval_config(raw, list(HydraConfig.get().overrides.task))
    except (ConfigError, FileNotFoundError) as err:
        exit_config_error("eval", err)
    from dtr_scale.eval.evaluate import preflight
    from dtr_scale.eval.settings import EvaluationError

    try:
        preflight(cfg)
    except (EvaluationError, FileNotFoundError) as err:
        exit_config_error("eval", err)
    from dtr_scale.eval.watcher import failures, failures_message, resolve_checkpoint, run_eval

    run_eval(cfg, checkpoint=args.checkpoint, watch_run=args.watch, mode="submit" if args.submit else "inline",
             poll_s=args.poll_s, retry_failed=args.retry_failed)
    checkpoint = resolve_checkpoint(cfg.run_dir, args.checkpoint) if args.checkpoint else None
    failed = failures(cfg.run_dir, cfg, checkpoint)
    if failed:
        sys.exit(failures_message(failed))


if __name__ == "__main__":
    main()
