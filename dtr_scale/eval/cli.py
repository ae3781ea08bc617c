"""`dtr-scale eval`: score a run's checkpoints, one, all that are due, or as they appear.

    dtr-scale eval run_dir=RUN                                  every due checkpoint there now, and the newest
    dtr-scale eval run_dir=RUN --checkpoint 2000                that one only (a step, or a directory)
    dtr-scale eval run_dir=RUN --watch                          follow the run until training has finished
    dtr-scale eval run_dir=RUN --watch --submit                 one submitit job per checkpoint (its cluster)
    dtr-scale eval run_dir=RUN eval.averaging=[ema,phema:0.10] diffusion.cfg_scale=4.0

The settings are the run's own (from its newest checkpoint, else the config Hydra saved at
its start), with the key=value overrides on top. The table (RUN/eval/results.md) and the
plot (results.png) are rewritten at the end.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from dtr_scale.config import ConfigError, TrainConfig, to_train_config
from dtr_scale.eval import watcher
from dtr_scale.eval.results import read_results, write_report
from dtr_scale.train.checkpoint import checkpoint_dir, checkpoint_name, latest_checkpoint, read_meta

HYDRA_CONFIG = Path(".hydra") / "config.yaml"  # what dtr-train's Hydra saves in the run dir at start
log = logging.getLogger("dtr_scale")


def resolve_checkpoint(run_dir: str | Path, checkpoint: str) -> Path:
    """A checkpoint directory, or a step number of the run ("200" -> RUN_DIR/checkpoints/step_00000200)."""
    if checkpoint.isdigit():
        return checkpoint_dir(run_dir) / checkpoint_name(int(checkpoint))
    return Path(checkpoint)


def run_eval(cfg: TrainConfig, *, checkpoint: str | None = None, watch: bool = False, mode: str = "inline",
             poll_s: float = 10.0, max_wait_s: float | None = None, progress: bool = True) -> list[dict]:
    """Evaluate cfg.run_dir with cfg.eval's settings and return the records made here.

    checkpoint: that checkpoint only (a directory, or a step number of the run).
    watch:      follow the run, evaluating due checkpoints as they appear, until training has
                finished and they are all evaluated (mode "inline": here; "submit": one
                submitit job per checkpoint on cfg.cluster, or local processes).
    neither:    one pass over the due checkpoints there now, the newest included.
    The table (RUN_DIR/eval/results.md) and plot (results.png) are rewritten at the end."""
    run_dir = Path(cfg.run_dir)
    if checkpoint is not None:
        records = watcher.trigger(resolve_checkpoint(run_dir, checkpoint), cfg, mode=mode, progress=progress)
    elif watch:
        records = watcher.watch(run_dir, cfg, mode=mode, poll_s=poll_s, max_wait_s=max_wait_s, progress=progress)
    else:
        records = watcher.sweep(run_dir, cfg, mode=mode, finished=True, progress=progress)
    if read_results(run_dir):
        table, plot = write_report(run_dir)
        log.info("evaluation results in %s and %s:\n%s", table, plot, table.read_text())
    return records


def saved_run_config(run_dir: Path) -> dict:
    """The run's config as a plain dict: from its newest complete checkpoint, else from the
    config Hydra saved when training started."""
    newest = latest_checkpoint(run_dir)
    if newest is not None:
        return read_meta(newest)["config"]
    if (run_dir / HYDRA_CONFIG).is_file():
        return OmegaConf.to_container(OmegaConf.load(run_dir / HYDRA_CONFIG), resolve=False)
    raise FileNotFoundError(f"{run_dir} has no complete checkpoint and no {HYDRA_CONFIG}: pass the run_dir of a "
                            "run that has started (its training config is read from there)")


def eval_config(overrides: list[str]) -> TrainConfig:
    """The run's own config with key=value overrides; run_dir=RUN is required."""
    values = OmegaConf.from_dotlist(overrides)
    if not values.get("run_dir"):
        raise ConfigError("run_dir: name the run to evaluate, e.g. `dtr-scale eval run_dir=runs/my_run`")
    run_dir = Path(values.run_dir)
    merged = OmegaConf.merge(saved_run_config(run_dir), values)
    return to_train_config(OmegaConf.to_container(merged, resolve=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dtr-scale eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="run_dir=RUN (required) and config overrides key=value")
    parser.add_argument("--checkpoint", help="evaluate this checkpoint only: a step number or a directory")
    parser.add_argument("--watch", action="store_true", help="follow the run until training has finished")
    parser.add_argument("--submit", action="store_true",
                        help="evaluate in submitit jobs on the run's cluster (local processes without one)")
    parser.add_argument("--poll-s", type=float, default=30.0, help="--watch: seconds between looks at the run")
    args = parser.parse_intermixed_args(argv)  # options before, between or after the key=value overrides
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        cfg = eval_config(args.overrides)
    except (ConfigError, FileNotFoundError) as err:
        sys.exit(f"dtr-scale eval: {err}")
    run_eval(cfg, checkpoint=args.checkpoint, watch=args.watch, mode="submit" if args.submit else "inline",
             poll_s=args.poll_s)


if __name__ == "__main__":
    main()
