"""`dtr-train`: train a DiT from the Hydra config in configs/ (overrides on the command line).

    dtr-train                                   # the quick embedded run
    dtr-train model=dit_l2 routing=dtr weighting=ant_uw weighting.num_intervals=8
    dtr-train --help                            # config groups and options
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from dtr_scale.config import ConfigError, TrainConfig, to_train_config
from dtr_scale.data.synthetic import SyntheticLatents
from dtr_scale.eval.sample import sample_from_checkpoint
from dtr_scale.train.checkpoint import latest_checkpoint
from dtr_scale.train.loop import train

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")
log = logging.getLogger("dtr_scale")


def sample_at_end(cfg: TrainConfig) -> None:
    """Draw class-conditional samples from the final EMA model and, on the toy data,
    report how close they land to their class patterns."""
    ckpt = latest_checkpoint(cfg.run_dir)
    labels = torch.arange(cfg.sample_at_end) % cfg.model.num_classes
    latents = sample_from_checkpoint(ckpt, labels, seed=cfg.seed, progress=True)
    out = Path(cfg.run_dir) / "samples.pt"
    torch.save({"latents": latents, "labels": labels, "checkpoint": ckpt.name}, out)
    log.info("wrote %d samples (%s, %d steps, cfg %.2f) to %s", len(labels), cfg.diffusion.sampler,
             cfg.diffusion.sampling_steps, cfg.diffusion.cfg_scale, out)
    if cfg.data.kind == "synthetic":
        data = SyntheticLatents(cfg.data.num_samples, cfg.model.num_classes, tuple(latents.shape[1:]),
                                cfg.data.noise_std, cfg.seed)
        own = (latents - data.class_means[labels]).pow(2).mean().item()
        pure_noise = (torch.randn_like(latents) - data.class_means[labels]).pow(2).mean().item()
        log.info("sample MSE to own class pattern: %.4f (data noise floor %.4f, pure noise %.4f)",
                 own, cfg.data.noise_std**2, pure_noise)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(raw: DictConfig) -> None:
    try:
        cfg = to_train_config(raw)
    except ConfigError as err:
        log.error("config error: %s", err)
        sys.exit(2)
    result = train(cfg)
    log.info("training %s at step %d (run dir %s)", result.status, result.step, result.run_dir)
    if result.status == "finished" and cfg.sample_at_end > 0:
        sample_at_end(cfg)


if __name__ == "__main__":
    main()
