"""Evaluate one checkpoint: for each averaging spec, weights -> samples -> metrics -> one record.

With `eval.reference` (an ADM reference batch) the metrics are the ADM suite on the FID
Inception: FID, sFID, Inception Score, precision and recall. On the embedded digits without
a reference they are digits-FD and class accuracy on the project's digits classifier.
Records go to RUN_DIR/eval/results.jsonl; one already there is returned, not recomputed.

The model comes from the checkpoint (its own config); the sampler, the sample count and
the metrics from the `cfg` passed in (by default the checkpoint's), so one run can be
scored later with other settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtr_scale.config import TrainConfig
from dtr_scale.eval.averaging import averaged_model, checkpoint_step, run_dir_of
from dtr_scale.eval.generate import Decoder, SampleSpec, distributed_position, generate_samples, load_samples
from dtr_scale.eval.results import append_result, eval_dir, find_result, log_to_wandb, record_key
from dtr_scale.train.checkpoint import read_meta
from dtr_scale.train.components import build_diffusion, config_from_dict

ADM_REFERENCE_BATCHES = "https://github.com/openai/guided-diffusion/tree/main/evaluations"
log = logging.getLogger(__name__)


class EvaluationError(ValueError):
    """A run or setting the evaluator cannot score; the message says what to set."""


def eval_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that, with the step and the averaging, identify a result."""
    d, e = cfg.diffusion, cfg.eval
    return {"sampler": d.sampler, "sampling_steps": d.sampling_steps, "cfg_scale": d.cfg_scale,
            "guided_channels": d.guided_channels, "ddim_eta": d.ddim_eta, "num_samples": e.num_samples,
            "labels": e.labels, "seed": e.seed, "reference": reference_name(cfg)}


def require_images(cfg: TrainConfig) -> None:
    if cfg.data.kind != "shards":
        raise EvaluationError(f"data.kind={cfg.data.kind} has no images to decode latents into; the evaluator "
                              "scores runs on image datasets (data=digits, or shards prepared with dtr-prep)")


def reference_name(cfg: TrainConfig) -> str:
    """What the samples are compared with: the reference batch's file name, or "digits"."""
    require_images(cfg)
    if cfg.eval.reference:
        return Path(cfg.eval.reference).name
    if cfg.data.embedded:
        return "digits"
    raise EvaluationError("eval.reference is not set: point it at an ADM reference batch (.npz, e.g. "
                          "VIRTUAL_imagenet256_labeled.npz); only the embedded digits are scored without one")


def result_key(step: int, averaging: str, cfg: TrainConfig) -> tuple:
    return record_key({"step": step, "averaging": averaging, **eval_settings(cfg)})


def samples_folder(run_dir: str | Path, step: int, averaging: str, cfg: TrainConfig) -> Path:
    """RUN_DIR/eval/samples/step_00000200-ema-ddpm250-cfg1.5-<hash of all settings>; the chunk
    size is among them, so a job with another eval.batch_size starts its own folder."""
    settings = eval_settings(cfg)
    hashed = {**settings, "chunk_size": cfg.eval.batch_size}
    digest = hashlib.sha1(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:8]
    name = (f"step_{step:08d}-{averaging.replace(':', '')}-{settings['sampler']}{settings['sampling_steps']}"
            f"-cfg{settings['cfg_scale']:g}-{digest}")
    return eval_dir(run_dir) / "samples" / name


def sample_spec(cfg: TrainConfig, run_cfg: TrainConfig, step: int, averaging: str) -> SampleSpec:
    """What to draw: the model's classes and latent shape (run_cfg), the sampler and counts (cfg)."""
    d, e, m = cfg.diffusion, cfg.eval, run_cfg.model
    return SampleSpec(weights=f"step_{step:08d}/{averaging}", num_samples=e.num_samples, chunk_size=e.batch_size,
                      num_classes=m.num_classes, latent_shape=(m.in_channels, m.input_size, m.input_size),
                      labels=e.labels, seed=e.seed, sampler=d.sampler, sampling_steps=d.sampling_steps,
                      cfg_scale=d.cfg_scale, guided_channels=d.guided_channels, ddim_eta=d.ddim_eta)


def eval_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def dataset_decoder(cfg: TrainConfig, device: torch.device) -> Decoder:
    """The decoder of the autoencoder the run's dataset was encoded with (its manifest names it)."""
    require_images(cfg)
    from dtr_scale.data_prep.autoencoders import load_autoencoder
    from dtr_scale.data.loader import read_manifest

    return load_autoencoder(read_manifest(cfg.data.path)["autoencoder"], device=str(device)).decode


def score_samples(images: np.ndarray, labels: np.ndarray, cfg: TrainConfig) -> dict[str, Any]:
    """The metrics of a sample batch: the ADM suite against eval.reference, else the digits scores."""
    if cfg.eval.reference:
        return adm_scores(images, cfg.eval.reference, cfg.eval.inception, eval_device(cfg), cfg.eval.batch_size)
    reference_name(cfg)  # raises without a reference on data other than the digits
    from dtr_scale.eval.digits import digits_scores

    return digits_scores(images, labels)


def preflight(cfg: TrainConfig) -> None:
    """Check, before anything is sampled, that the files the metrics need are there: the
    reference batch and the FID Inception weights (ADM suite), or the digits (embedded data).
    Raises EvaluationError / FileNotFoundError naming the file and where to get it."""
    reference_name(cfg)
    if not cfg.eval.reference:
        return
    reference = Path(cfg.eval.reference).expanduser()
    if not reference.is_file():
        raise FileNotFoundError(f"eval.reference={cfg.eval.reference}: no such file. ADM's reference batches (e.g. "
                                f"VIRTUAL_imagenet256_labeled.npz) are listed at {ADM_REFERENCE_BATCHES}; download "
                                "the one for your dataset and resolution and point eval.reference at it")
    from dtr_scale.eval.features import inception_weights_path

    inception_weights_path(cfg.eval.inception)  # raises naming the file and its download address


def adm_scores(images: np.ndarray, reference: str | Path, inception: str | Path | None,
               device: torch.device | str = "cpu", batch_size: int = 64) -> dict[str, Any]:
    """FID, sFID, IS, precision, recall (k = 3) of `images` against an ADM reference batch, as
    ADM's evaluator computes them. Precomputed reference statistics are used where the batch
    has them; precision/recall need its images (arr_0) and are None without."""
    from dtr_scale.eval.features import InceptionFeatures
    from dtr_scale.eval.metrics import (feature_statistics, frechet_distance, inception_score,
                                        load_reference_batch, precision_recall)

    net = InceptionFeatures(inception).to(device)
    fake = net.extract(images, batch_size)
    ref = load_reference_batch(reference, images=True)
    real = net.extract(ref.images, batch_size) if ref.images is not None else None
    mu, sigma = (ref.mu, ref.sigma) if ref.mu is not None else feature_statistics(real["pool"])
    mu_s, sigma_s = (ref.mu_s, ref.sigma_s) if ref.mu_s is not None else (
        feature_statistics(real["spatial"]) if real is not None else (None, None))
    precision, recall = precision_recall(real["pool"], fake["pool"], device=device) if real is not None else (None, None)
    return {"fid": frechet_distance(*feature_statistics(fake["pool"]), mu, sigma),
            "sfid": frechet_distance(*feature_statistics(fake["spatial"]), mu_s, sigma_s) if mu_s is not None else None,
            "inception_score": inception_score(fake["logits"]), "precision": precision, "recall": recall,
            "num_samples": int(len(images))}


def evaluate_averaging(checkpoint: str | Path, averaging: str, cfg: TrainConfig, *, rank: int = 0,
                       world_size: int = 1, progress: bool = False) -> dict[str, Any] | None:
    """Score one averaging of one checkpoint; the record on rank 0, None on the other ranks.
    Sampling resumes from the chunks already in the samples folder."""
    run_dir, step = run_dir_of(checkpoint), checkpoint_step(checkpoint)
    key = result_key(step, averaging, cfg)
    done = find_result(run_dir, key)
    if done is not None:
        log.info("step %d %s already evaluated (%s); not recomputing", step, averaging, run_dir / "eval")
        return done if rank == 0 else None
    preflight(cfg)
    start = time.perf_counter()
    model, run_cfg = averaged_model(checkpoint, averaging,
                                    allow_missing_snapshots=cfg.eval.allow_missing_snapshots)
    device = eval_device(cfg)
    diffusion = build_diffusion(run_cfg).respaced(cfg.diffusion.sampling_steps, cfg.diffusion.sampler)
    npz = generate_samples(model, diffusion, sample_spec(cfg, run_cfg, step, averaging),
                           samples_folder(run_dir, step, averaging, cfg), dataset_decoder(cfg, device),
                           rank=rank, world_size=world_size, device=device, progress=progress)
    if npz is None:
        return None
    sampled = time.perf_counter()
    images, labels = load_samples(npz)
    metrics = score_samples(images, labels, cfg)
    record = {"step": step, "averaging": averaging, **eval_settings(cfg), **metrics,
              "checkpoint": str(checkpoint), "samples": str(npz), "sample_s": sampled - start,
              "metric_s": time.perf_counter() - sampled, "wall_s": time.perf_counter() - start,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    stored = append_result(run_dir, record)
    if stored is not record:  # another evaluator stored this result first; its record stands
        return stored
    log_to_wandb(run_dir, cfg, [record])
    log.info("step %d %s: %s", step, averaging, {k: v for k, v in metrics.items() if v is not None})
    return record


def evaluate_checkpoint(checkpoint: str | Path, cfg: TrainConfig | None = None, *,
                        averaging: list[str] | None = None, rank: int | None = None,
                        world_size: int | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """Evaluate `checkpoint` (RUN_DIR/checkpoints/step_N) for each averaging spec (default
    cfg.eval.averaging) and return the records (on rank 0; [] on the others). `cfg` holds the
    evaluation settings; None: the run's own config from the checkpoint. rank/world_size
    default to RANK/WORLD_SIZE: every rank samples its chunks, rank 0 merges and scores."""
    cfg = cfg if cfg is not None else config_from_dict(read_meta(checkpoint)["config"])
    rank, world_size = distributed_position(rank, world_size)
    records = []
    for spec in averaging or cfg.eval.averaging:
        record = evaluate_averaging(checkpoint, spec, cfg, rank=rank, world_size=world_size, progress=progress)
        if record is not None:
            records.append(record)
    return records
