"""`dtr-scale train` (= `dtr-train`): train a DiT from the Hydra config in configs/.

    dtr-train                                   # the embedded main job on the digits
    dtr-train cluster=null world_size=1         # the same, in this process
    dtr-train experiment=dtr_paper/dit_l2_dtr_antuw_2m cluster=my_slurm
    dtr-train --help                            # config groups and options

With `cluster` set the run is submitted through submitit (local processes or
SLURM); without it, it trains here (world_size local processes). Either way a
run resumes from the latest complete checkpoint in its run_dir.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from dtr_scale.config import ConfigError, TrainConfig, to_train_config
from dtr_scale.launch.follow import JobFailed, follow_job
from dtr_scale.launch.submit import submit_training
from dtr_scale.data.synthetic import SyntheticLatents
from dtr_scale.eval.sample import sample_from_checkpoint
from dtr_scale.train.checkpoint import latest_checkpoint
from dtr_scale.train.local import run_processes
from dtr_scale.train.loop import train

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
log = logging.getLogger("dtr_scale")


def prepare_embedded_data(cfg: TrainConfig) -> None:
    if cfg.data.embedded and not (Path(cfg.data.path) / "manifest.json").exists():
        from data_prep.digits import prepare_digits

        log.info("preparing the embedded digits into %s", cfg.data.path)
        prepare_digits(cfg.data.path, format=cfg.data.format)


def sample_at_end(cfg: TrainConfig) -> None:
    """Draw class-conditional samples from the final EMA model; on images, decode them,
    save a grid and (for the digits) score them; on the toy data, report how close
    they land to their class patterns."""
    ckpt = latest_checkpoint(cfg.run_dir)
    labels = torch.arange(cfg.sample_at_end) % cfg.model.num_classes
    latents = sample_from_checkpoint(ckpt, labels, seed=cfg.seed, progress=True)
    out = Path(cfg.run_dir) / "samples.pt"
    torch.save({"latents": latents, "labels": labels, "checkpoint": ckpt.name}, out)
    log.info("wrote %d samples (%s, %d steps, cfg %.2f) to %s", len(labels), cfg.diffusion.sampler,
             cfg.diffusion.sampling_steps, cfg.diffusion.cfg_scale, out)
    if cfg.data.kind == "shards":
        write_images(cfg, latents, labels, ckpt.name)
    if cfg.data.kind == "synthetic":
        data = SyntheticLatents(cfg.data.num_samples, cfg.model.num_classes, tuple(latents.shape[1:]),
                                cfg.data.noise_std, cfg.seed)
        own = (latents - data.class_means[labels]).pow(2).mean().item()
        pure_noise = (torch.randn_like(latents) - data.class_means[labels]).pow(2).mean().item()
        log.info("sample MSE to own class pattern: %.4f (data noise floor %.4f, pure noise %.4f)",
                 own, cfg.data.noise_std**2, pure_noise)


def write_images(cfg: TrainConfig, latents: torch.Tensor, labels: torch.Tensor, checkpoint: str) -> None:
    from torchvision.utils import save_image

    from data_prep.autoencoders import load_autoencoder
    from dtr_scale.data.loader import read_manifest

    autoencoder = load_autoencoder(read_manifest(cfg.data.path)["autoencoder"])
    images = autoencoder.decode(latents).cpu()  # uint8 [N, H, W, 3]
    grid = Path(cfg.run_dir) / "samples.png"
    save_image(images.permute(0, 3, 1, 2).float() / 255, grid, nrow=cfg.model.num_classes)
    log.info("sample grid (one class per column) in %s", grid)
    if cfg.data.embedded:
        from dtr_scale.eval.digits import digits_scores

        scores = {"checkpoint": checkpoint, **digits_scores(images.numpy(), labels.numpy())}
        (Path(cfg.run_dir) / "results.json").write_text(json.dumps(scores, indent=1))
        log.info("digits-FD %.2f, class accuracy %.3f over %d samples", scores["digits_fd"],
                 scores["class_accuracy"], scores["num_samples"])


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Jobs may start in another directory: pin the run's paths to this one."""
    cfg.run_dir = str(Path(cfg.run_dir).resolve())
    if cfg.data.path:
        cfg.data.path = str(Path(cfg.data.path).resolve())
    return cfg


def run_training(cfg: TrainConfig) -> None:
    """Train `cfg` here or as a submitted job, then (when this process saw the end) sample."""
    cfg = absolute_paths(cfg)
    prepare_embedded_data(cfg)
    if cfg.cluster is None:
        if cfg.world_size == 1:
            train(cfg)
        else:
            log.info("training on %d local processes (gloo)", cfg.world_size)
            run_processes(cfg, cfg.world_size)
    else:
        job = submit_training(cfg, cfg.cluster)
        log.info("submitted job %s (%s, %d processes); run dir %s", job.job_id, cfg.cluster.kind,
                 cfg.world_size, cfg.run_dir)
        if not cfg.cluster.follows:
            log.info("follow it with: dtr-scale status %s", cfg.run_dir)
            return
        follow_job(job, cfg.run_dir, cfg.steps)
    log.info("training finished at step %d (run dir %s)", cfg.steps, cfg.run_dir)
    if cfg.sample_at_end > 0:
        sample_at_end(cfg)


def config_or_exit(raw: DictConfig) -> TrainConfig:
    try:
        return to_train_config(raw)
    except ConfigError as err:
        log.error("config error: %s", err)
        sys.exit(2)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(raw: DictConfig) -> None:
    try:
        run_training(config_or_exit(raw))
    except JobFailed as err:
        log.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
