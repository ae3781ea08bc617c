"""Launch checks: what would make a run fail after its job was submitted or its run directory
written, checked before either happens. Each problem is one line naming the key or file and
the fix. They read files, permissions and installed packages, never import torch for a job
that runs elsewhere: `dtr-scale train` runs them once per launch, in a Hydra callback
(run.LaunchCheck) before Hydra creates the run directory, so a refused launch leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dtr_scale.config import ConfigError, TrainConfig
from dtr_scale.data.shard_format import MANIFEST_NAME, ShardDataError, read_manifest
from dtr_scale.extras import missing_extra
from dtr_scale.io import CorruptFileError


class LaunchCheckError(ConfigError):
    """One or more launch checks failed; `problems` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _writable_ancestor(path: Path) -> Path:
    """The nearest directory at or above `path` that exists (where mkdir -p would start)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def writable_problem(key: str, path: str) -> str | None:
    """Can the run create (or write in) directory `path`?"""
    target = Path(path)
    if target.exists() and not target.is_dir():
        return f"{key}={path} is a file, not a directory: give a directory path"
    base = _writable_ancestor(target)
    if not base.is_dir():
        return f"{key}={path}: {base} is a file, so no directory can be made under it; give another {key}"
    if not os.access(base, os.W_OK | os.X_OK):
        return f"{key}={path}: {base} is not writable by this user; choose a {key} on a filesystem you can write to"
    return None


def will_prepare_digits(cfg: TrainConfig) -> bool:
    """The embedded digits are prepared into data.path on first use (run.prepare_embedded_data)."""
    return cfg.data.embedded and not (Path(cfg.data.path) / MANIFEST_NAME).exists()


def manifest_problems(cfg: TrainConfig, manifest: dict) -> list[str]:
    """A prepared dataset the model cannot train on: another shard format, latent shape, or more classes."""
    where = f"data.remote={cfg.data.remote}" if cfg.data.remote else f"data.path={cfg.data.path}"
    model = cfg.model
    problems = []
    if manifest.get("format", cfg.data.format) != cfg.data.format:
        problems.append(f"{where} holds {manifest['format']} shards but data.format={cfg.data.format}: "
                        f"set data.format={manifest['format']}")
    shape = tuple(manifest.get("latent_shape", ()))
    wanted = (model.in_channels, model.input_size, model.input_size)
    if shape and shape != wanted:
        problems.append(f"{where} holds {' x '.join(map(str, shape))} latents but the model takes in_channels x "
                        f"input_size x input_size = {' x '.join(map(str, wanted))}: set model.in_channels="
                        f"{shape[0]} model.input_size={shape[1]}, or point data.path at latents of the model's size")
    classes = manifest.get("num_classes")
    # Fewer classes than the model has is a subset (its labels fit); more would index past the label table.
    if classes is not None and classes > model.num_classes:
        problems.append(f"{where} has {classes} classes but model.num_classes={model.num_classes}: "
                        f"set model.num_classes={classes}")
    return problems


def data_problems(cfg: TrainConfig) -> list[str]:
    """The dataset the run will read is there, readable and fits the model."""
    if cfg.data.kind != "shards":
        return []  # synthetic data is made in memory
    remote = cfg.data.remote
    # The job writes data.path: shards fetched into it from data.remote, or the digits prepared there.
    if remote or will_prepare_digits(cfg):
        if problem := writable_problem("data.path", cfg.data.path):
            return [problem]
        if not remote:
            return []
    try:
        manifest = remote_manifest(remote, cfg.data.path) if remote else read_manifest(cfg.data.path)
    except (ShardDataError, CorruptFileError) as err:
        return [f"{f'data.remote={remote}' if remote else 'data.path'}: {err}"]
    return manifest_problems(cfg, manifest)


def remote_manifest(remote: str, cache: str) -> dict:
    """The manifest at `remote`, fetched into a temporary file with the loader's own download: an unreachable
    store or a prefix without the dataset is named here, and the cache, which the job fills on its node, is
    left alone."""
    from dtr_scale.data.remote import download  # streaming's clients: only for a remote dataset

    with tempfile.TemporaryDirectory(prefix="dtr-launch-check-") as scratch:
        local = os.path.join(scratch, MANIFEST_NAME)
        download(remote, cache, MANIFEST_NAME, local)
        return read_manifest(local)


def device_problem(cfg: TrainConfig) -> str | None:
    """GPU training needs GPUs where the ranks run: on the cluster's nodes, or here."""
    if not cfg.device.startswith("cuda"):
        return None
    if cfg.cluster is not None:
        if cfg.cluster.gpus_per_node == 0:
            return (f"device={cfg.device} but cluster.gpus_per_node=0 (cluster.kind={cfg.cluster.kind}): the job's "
                    f"ranks would find no GPU. Set cluster.gpus_per_node={cfg.world_size // cfg.cluster.nodes} "
                    f"(one GPU per rank) on a GPU machine or cluster, or device=cpu")
        return None
    import torch  # cluster=null trains in this process, which needs torch next anyway

    found = torch.cuda.device_count()
    if found < cfg.world_size:
        return (f"device={cfg.device} with world_size={cfg.world_size} trains here (cluster=none) but this machine "
                f"has {found} GPU(s): set world_size={found} or device=cpu, or submit with cluster=...")
    return None


def extras_problems(cfg: TrainConfig) -> list[str]:
    """The optional packages this run's settings need (pyproject's extras)."""
    needed = []
    if cfg.logging.wandb != "disabled":
        needed.append("wandb")
    if cfg.logging.tensorboard:
        needed.append("tensorboard")
    if cfg.backend.name == "deepspeed":
        needed.append("deepspeed")
    if cfg.weighting.kind == "ant_nash":
        needed += ["cvxpy", "ecos"]
    if cfg.data.kind == "shards" and will_prepare_digits(cfg):
        needed.append("sklearn")
    return [message for module in needed if (message := missing_extra(module))]


def weights_problem(cfg: TrainConfig) -> str | None:
    """Released weights to start from must be a file that is there (read before any model is built)."""
    path = cfg.model.init_from
    if path is None or Path(path).is_file():
        return None
    return (f"model.init_from={path}: no such file; give the path of a DiT state dict (.pt or .safetensors), "
            f"or drop model.init_from to start from random weights")


def evaluation_problems(cfg: TrainConfig) -> list[str]:
    """Scoring checkpoints during or after training (inline here, or as jobs at save time) needs the
    ADM reference batch, the FID Inception weights and the [eval] extra: found missing hours into
    the run otherwise. The embedded digits need none of them."""
    evaluates = cfg.eval.at_save or (cfg.eval.inline and (cfg.cluster is None or cfg.cluster.follows))
    if cfg.data.kind != "shards" or cfg.data.embedded or not evaluates:
        return []
    from dtr_scale.eval.settings import EvaluationError, reference_name

    problems = [message] if (message := missing_extra("torch_fidelity")) else []
    try:
        reference_name(cfg)  # without torch: is a reference batch named at all?
        from dtr_scale.eval.evaluate import preflight  # imports torch: only for a run that names one

        preflight(cfg)
    except (EvaluationError, FileNotFoundError) as err:
        problems.append(f"{err} (or set eval.inline=false eval.at_save=false and score the run later with "
                        f"`dtr-scale eval`)")
    return problems


def launch_problems(cfg: TrainConfig) -> list[str]:
    """Every launch check's problem, one line each; [] when the run can start."""
    problems = [*data_problems(cfg), device_problem(cfg), *extras_problems(cfg), weights_problem(cfg),
                *evaluation_problems(cfg), writable_problem("run_dir", cfg.run_dir)]
    return [problem for problem in problems if problem]


def check_launch(cfg: TrainConfig) -> None:
    """Raise LaunchCheckError listing every problem that would stop `cfg` after it was launched."""
    problems = launch_problems(cfg)
    if problems:
        raise LaunchCheckError(problems)
