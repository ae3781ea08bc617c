"""`dtr-scale train` (= `dtr-train`): a whole run from the Hydra config in dtr_scale/configs/:
train here or submit the job, follow it, evaluate beside it, report at the end.

    dtr-train                                   # the embedded main job on the digits
    dtr-train cluster=none world_size=1         # the same, in this process
    dtr-train run_dir=runs/my_run steps=5000    # resume runs/my_run and train on to step 5000
    dtr-train experiment=dtr_paper/dit_l2_dtr_antuw_2m cluster=my_slurm
    dtr-train --help                            # config groups and options

With `cluster` set the run is submitted through submitit (local processes or
SLURM); with cluster=none it trains here (world_size local processes). Either way
a run resumes from the latest complete checkpoint in its run_dir, refusing a
setting its checkpoints were not trained with.

This module sits above training, evaluation and launching: it hands the evaluator's
at-save hook to the trainer (eval.at_save), so training itself knows nothing of either.
"""

from __future__ import annotations

import copy
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from dtr_scale.command_line import exit_config_error, run_hydra
from dtr_scale.config import ConfigError, TrainConfig, resume_changes, to_train_config
from dtr_scale.preflight import check_launch, data_problems, will_prepare_digits
from dtr_scale.train.manifest import latest_checkpoint, read_meta
from dtr_scale.train.resume_from import check_resume_from, in_run, start_from

if TYPE_CHECKING:
    import submitit

    from dtr_scale.train.loop import TrainResult

# torch, DCP, submitit, numpy and the trainer are imported where a run starts, not here: --help,
# --cfg job and a refused config answer without them (tests/test_cli.py checks none is imported).

log = logging.getLogger("dtr_scale")


def trainer(cfg: TrainConfig) -> Callable[..., TrainResult]:
    """train() with the evaluator's at-save hook of `cfg` (eval.at_save); it pickles, so a
    submitted job takes it along."""
    from dtr_scale.eval import watcher
    from dtr_scale.train.loop import train

    return functools.partial(train, on_checkpoint=watcher.at_save_hook(cfg))


def submit_run(cfg: TrainConfig) -> submitit.Job:
    """Submit training of `cfg` on cfg.cluster, with evaluation jobs at save time if cfg asks."""
    from dtr_scale.launch.submit import submit_training

    return submit_training(cfg, cfg.cluster, train_fn=trainer(cfg))


def prepare_embedded_data(cfg: TrainConfig) -> None:
    if will_prepare_digits(cfg):
        from dtr_scale.data_prep.digits import prepare_digits

        log.info("preparing the embedded digits into %s", cfg.data.path)
        prepare_digits(cfg.data.path, format=cfg.data.format)
        problems = data_problems(cfg)  # before preparing, only data.path's writability was checked
        if problems:
            raise ConfigError("; ".join(problems))


def report_synthetic_samples(cfg: TrainConfig) -> None:
    """Toy latents have a known answer: how close do samples of the final EMA model land to
    their class's pattern, against the data's own noise and against pure noise?"""
    import torch

    from dtr_scale.data.synthetic import SyntheticLatents
    from dtr_scale.eval.sample import sample_from_checkpoint

    ckpt = latest_checkpoint(cfg.run_dir)
    labels = torch.arange(cfg.sample_at_end) % cfg.model.num_classes
    latents = sample_from_checkpoint(ckpt, labels, seed=cfg.seed, progress=True)
    data = SyntheticLatents(cfg.data.num_samples, cfg.model.num_classes, tuple(latents.shape[1:]),
                            cfg.data.noise_std, cfg.seed)
    own = (latents - data.class_means[labels]).pow(2).mean().item()
    pure_noise = (torch.randn_like(latents) - data.class_means[labels]).pow(2).mean().item()
    log.info("sample MSE to own class pattern: %.4f (data noise floor %.4f, pure noise %.4f)",
             own, cfg.data.noise_std**2, pure_noise)


def evaluate_beside(cfg: TrainConfig) -> Callable[[], None] | None:
    """While following a job: score each due checkpoint here as it appears."""
    from dtr_scale.eval import watcher

    if not (cfg.eval.inline and cfg.data.kind == "shards"):
        return None
    return lambda: watcher.sweep(cfg.run_dir, cfg, mode="inline", finished=False)


def after_training(cfg: TrainConfig) -> None:
    if cfg.data.kind == "synthetic":
        if cfg.sample_at_end > 0:
            report_synthetic_samples(cfg)
    elif cfg.eval.inline:
        from dtr_scale.eval import watcher
        from dtr_scale.eval.results import results_table
        from dtr_scale.status import format_status, run_status

        watcher.run_eval(cfg)  # the due checkpoints not scored yet, and the final one; table and plot
        log.info("\n%s", format_status(run_status(cfg.run_dir), results_table(cfg.run_dir)))


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Jobs may start in another directory: pin the run's paths to this one."""
    cfg.run_dir = str(Path(cfg.run_dir).resolve())
    if cfg.data.path:
        cfg.data.path = str(Path(cfg.data.path).resolve())
    return cfg


def run_training(cfg: TrainConfig) -> None:
    """Train `cfg` here or as a submitted job; when this process sees the end, evaluate."""
    from dtr_scale.eval import watcher
    from dtr_scale.launch.environment import launched_world
    from dtr_scale.launch.follow import follow_job
    from dtr_scale.launch.launched import train_in_launched_world
    from dtr_scale.train.local import run_processes
    from dtr_scale.train.loop import train

    cfg = absolute_paths(cfg)
    at_save = watcher.at_save_hook(cfg)
    launched = launched_world()
    if launched is not None:  # torchrun or a plain srun started this process as one rank: join that world
        if cfg.cluster is not None:
            log.info("RANK %s of WORLD_SIZE %s set by the launcher: training here, not on cluster.kind=%s",
                     launched["RANK"], launched["WORLD_SIZE"], cfg.cluster.kind)
        train_in_launched_world(cfg, launched, prepare=prepare_embedded_data, on_checkpoint=at_save)
        if launched["RANK"] == "0":
            log.info("training finished at step %d (run dir %s)", cfg.steps, cfg.run_dir)
            after_training(cfg)
        return
    prepare_embedded_data(cfg)
    if cfg.cluster is None:
        if cfg.world_size == 1:
            train(cfg, on_checkpoint=at_save)
        else:
            log.info("training on %d local processes (gloo)", cfg.world_size)
            run_processes(cfg, cfg.world_size, on_checkpoint=at_save)
    else:
        job = submit_run(cfg)
        log.info("submitted job %s (%s, %d processes); run dir %s", job.job_id, cfg.cluster.kind,
                 cfg.world_size, cfg.run_dir)
        if not cfg.cluster.follows:
            log.info("follow it with: dtr-scale status %s", cfg.run_dir)
            return
        follow_job(job, cfg.run_dir, cfg.steps, beside=evaluate_beside(cfg))
    log.info("training finished at step %d (run dir %s)", cfg.steps, cfg.run_dir)
    after_training(cfg)


def check_resume(cfg: TrainConfig) -> None:
    """Resuming run_dir (from its latest checkpoint, or resume_from's): refuse a setting the
    checkpoint was not trained with (ConfigError naming each), and log the harmless changes
    (steps, evaluation, cluster, ...). Another run's checkpoint (resume_from=PATH) joins this
    run's own earlier ones, so both must match."""
    chosen, newest = check_resume_from(cfg), latest_checkpoint(cfg.run_dir)
    if chosen is not None and in_run(chosen, cfg.run_dir):
        newest = None
    if chosen is None and newest is None:
        return
    from dtr_scale.train.components import config_to_dict

    for source in (chosen, newest):
        if source is None:
            continue
        breaking, harmless = resume_changes(read_meta(source)["config"], config_to_dict(cfg))
        for change in harmless:
            log.info("resuming %s with a changed %s", cfg.run_dir, change)
        what = (f"resume_from={cfg.resume_from}: {source} was trained" if source == chosen else
                f"run_dir {cfg.run_dir} was trained to {source.name}")
        if breaking:
            raise ConfigError(f"{what} with other settings, and a resume must keep them; this command changes "
                              f"{'; '.join(breaking)}. Set them back (or drop those overrides), or give a new "
                              f"run_dir to start a new run")


def launched_rank() -> int:
    """This process's rank where a launcher (torchrun, srun) placed it in a world; else 0."""
    from dtr_scale.launch.environment import launched_world

    launched = launched_world()
    return 0 if launched is None else int(launched["RANK"])


def checked_config(raw: DictConfig) -> TrainConfig:
    """The typed config of a launch that can start: schema and values, a resume that keeps its
    run's settings, and every launch check (dtr_scale/preflight.py); else ConfigError."""
    cfg = absolute_paths(to_train_config(raw))
    check_resume(cfg)
    check_launch(cfg)
    return cfg


def job_config(config: DictConfig) -> DictConfig:
    """The task's config as Hydra has it before the run directory exists: without the `hydra`
    node, and run_dir's default (${hydra:runtime.output_dir}, set only once the directory is
    made) read from hydra.run.dir, the directory Hydra is about to make."""
    job = copy.deepcopy(config)  # still typed by the schema (a masked_copy is plain data: a slower check)
    with open_dict(job):
        del job["hydra"]
    if OmegaConf.to_container(config, resolve=False).get("run_dir") == "${hydra:runtime.output_dir}":
        job.run_dir = OmegaConf.select(config, "hydra.run.dir")
    return job


class LaunchCheck(Callback):
    """Hydra calls on_run_start after composing the config and before it creates the run directory
    (train.yaml names this callback): a launch that cannot work stops here, leaving no runs/DATE/TIME.
    Exceptions in callbacks only warn in Hydra, so it exits itself. A multirun calls no on_run_start:
    train_command checks each of its jobs, inside the directory their sweep made."""

    passed = False  # until train_command takes it: the run it starts is not checked again (a remote manifest, twice)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.job.name != "train":
            return  # plan and eval compose train.yaml too, and launch nothing
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in the config; run_job sets it next anyway
        try:
            checked_config(job_config(config))
        except ConfigError as err:
            exit_config_error("train", err)
        LaunchCheck.passed = True


def train_command(raw: DictConfig) -> None:
    from dtr_scale.launch.follow import JobFailed

    checked, LaunchCheck.passed = LaunchCheck.passed, False
    try:
        cfg = absolute_paths(to_train_config(raw)) if checked else checked_config(raw)
        if launched_rank() == 0:  # once per run: torchrun's other ranks find it applied
            start_from(cfg)  # resume_from: the chosen checkpoint becomes the latest, the later ones moved aside
    except ConfigError as err:
        exit_config_error("train", err)
    try:
        run_training(cfg)
    except JobFailed as err:
        log.error("%s", err)
        sys.exit(1)


def main() -> None:
    run_hydra("train", "train", train_command, sys.argv[1:])


if __name__ == "__main__":
    main()
