"""A run's saved training config as the evaluator may use it: settings, never commands.

A run directory is data. Whoever can write into it (a shared project folder, a copied
run) must not get a shell command run by the next `dtr-scale eval --submit`, so the
cluster fields that reach a job script as shell text (cluster.setup lines run before
srun, cluster.sbatch_extra lines) are dropped from the saved config: they come only from
the command line of this evaluation. The other cluster strings end up on `#SBATCH` lines
too, so one with a line break (which would start a command there) is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dtr_scale.config import ConfigError, without_retired_keys
from dtr_scale.train.checkpoint import latest_checkpoint, read_meta

HYDRA_CONFIG = Path(".hydra") / "config.yaml"  # what `dtr-scale train`'s Hydra saves in the run dir at start
SHELL_FIELDS = ("setup", "sbatch_extra")  # cluster fields a job script runs or writes verbatim

log = logging.getLogger(__name__)


def without_shell_lines(config: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """`config` (read from the file `source`) without its cluster's shell fields; ConfigError
    naming the file if another cluster string holds a line break."""
    cluster = config.get("cluster")
    if not isinstance(cluster, dict):
        return config
    dropped = [name for name in SHELL_FIELDS if cluster.get(name)]
    if dropped:
        log.warning("%s: not using its cluster.%s (shell lines are run only from this command line; "
                    "give them there, e.g. cluster.setup='[module load cuda]')", source, "/".join(dropped))
    kept = {name: value for name, value in cluster.items() if name not in SHELL_FIELDS}
    for name, value in kept.items():
        if isinstance(value, str) and ("\n" in value or "\r" in value):
            raise ConfigError(f"cluster.{name} in {source} holds a line break, which would run as a command in the "
                              f"job script; fix that file or give cluster.{name}=... on the command line")
    return {**config, "cluster": kept}


def saved_run_config(run_dir: Path) -> dict:
    """The run's config as a plain dict: from its newest complete checkpoint, else from the
    config Hydra saved when training started; without the shell lines."""
    newest = latest_checkpoint(run_dir)
    if newest is not None:
        return without_shell_lines(without_retired_keys(read_meta(newest)["config"]), newest / "meta.json")
    if (run_dir / HYDRA_CONFIG).is_file():
        saved = OmegaConf.to_container(OmegaConf.load(run_dir / HYDRA_CONFIG), resolve=False)
        return without_shell_lines(without_retired_keys(saved), run_dir / HYDRA_CONFIG)
    raise FileNotFoundError(f"{run_dir} has no complete checkpoint and no {HYDRA_CONFIG}: pass the run_dir of a "
                            "run that has started (its training config is read from there)")
