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
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from dtr_scale.cli import flag_parser, run_hydra, split_flags
from dtr_scale.config import ConfigError, TrainConfig, to_train_config
from dtr_scale.eval import watcher
from dtr_scale.eval.evaluate import EvaluationError, preflight
from dtr_scale.eval.results import read_results, write_report
from dtr_scale.eval.saved_config import without_shell_lines
from dtr_scale.train.checkpoint import checkpoint_dir, checkpoint_name, latest_checkpoint, read_meta

HYDRA_CONFIG = Path(".hydra") / "config.yaml"  # what dtr-train's Hydra saves in the run dir at start
log = logging.getLogger("dtr_scale")


def resolve_checkpoint(run_dir: str | Path, checkpoint: str) -> Path:
    """A checkpoint directory, or a step number of the run ("200" -> RUN_DIR/checkpoints/step_00000200)."""
    if checkpoint.isdigit():
        return checkpoint_dir(run_dir) / checkpoint_name(int(checkpoint))
    return Path(checkpoint)


def run_eval(cfg: TrainConfig, *, checkpoint: str | None = None, watch: bool = False, mode: str = "inline",
             poll_s: float = 10.0, max_wait_s: float | None = None, progress: bool = True,
             retry_failed: bool = False) -> list[dict]:
    """Evaluate cfg.run_dir with cfg.eval's settings and return the records made here.

    checkpoint: that checkpoint only (a directory, or a step number of the run).
    watch:      follow the run, evaluating due checkpoints as they appear, until training has
                finished and they are all evaluated (mode "inline": here; "submit": one
                submitit job per checkpoint on cfg.cluster, or local processes).
    neither:    one pass over the due checkpoints there now, the newest included.
    retry_failed: take items whose earlier attempt failed again.
    The table (RUN_DIR/eval/results.md) and plot (results.png) are rewritten at the end."""
    run_dir = Path(cfg.run_dir)
    if checkpoint is not None:
        records = watcher.trigger(resolve_checkpoint(run_dir, checkpoint), cfg, mode=mode, progress=progress,
                                  retry_failed=retry_failed)
    elif watch:
        records = watcher.watch(run_dir, cfg, mode=mode, poll_s=poll_s, max_wait_s=max_wait_s, progress=progress,
                                retry_failed=retry_failed)
    else:
        records = watcher.sweep(run_dir, cfg, mode=mode, finished=True, progress=progress, retry_failed=retry_failed)
    if read_results(run_dir):
        table, plot = write_report(run_dir)
        log.info("evaluation results in %s and %s:\n%s", table, plot, table.read_text())
    return records


def saved_run_config(run_dir: Path) -> dict:
    """The run's config as a plain dict: from its newest complete checkpoint, else from the
    config Hydra saved when training started; without the shell lines (see saved_config)."""
    newest = latest_checkpoint(run_dir)
    if newest is not None:
        return without_shell_lines(read_meta(newest)["config"], newest / "meta.json")
    if (run_dir / HYDRA_CONFIG).is_file():
        return without_shell_lines(OmegaConf.to_container(OmegaConf.load(run_dir / HYDRA_CONFIG), resolve=False),
                                   run_dir / HYDRA_CONFIG)
    raise FileNotFoundError(f"{run_dir} has no complete checkpoint and no {HYDRA_CONFIG}: pass the run_dir of a "
                            "run that has started (its training config is read from there)")


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

        try:
            evaluate_weights_command(to_train_config(raw), args.weights, args.autoencoder)
        except (ConfigError, EvaluationError, FileNotFoundError, ValueError) as err:
            sys.exit(f"dtr-scale eval: {err}")
        return
    try:
        cfg = eval_config(raw, list(HydraConfig.get().overrides.task))
        preflight(cfg)
    except (ConfigError, EvaluationError, FileNotFoundError) as err:
        sys.exit(f"dtr-scale eval: {err}")
    run_eval(cfg, checkpoint=args.checkpoint, watch=args.watch, mode="submit" if args.submit else "inline",
             poll_s=args.poll_s, retry_failed=args.retry_failed)
    checkpoint = resolve_checkpoint(cfg.run_dir, args.checkpoint) if args.checkpoint else None
    failed = watcher.failures(cfg.run_dir, cfg, checkpoint)
    if failed:
        sys.exit(watcher.failures_message(failed))


if __name__ == "__main__":
    main()
