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

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtr_scale.config import TrainConfig
from dtr_scale.eval.averaging import averaged_model
from dtr_scale.eval.generate import Decoder, distributed_position, generate_samples, load_samples
from dtr_scale.eval.results import append_result, find_result, log_to_tensorboard, log_to_wandb
from dtr_scale.eval.settings import EvalSettings, reference_name, require_images
from dtr_scale.eval.training_cost import training_cost
from dtr_scale.provenance import collect_provenance
from dtr_scale.train.checkpoint import open_checkpoint, require_complete
from dtr_scale.train.components import build_diffusion
from dtr_scale.world import World

ADM_REFERENCE_BATCHES = "https://github.com/openai/guided-diffusion/tree/main/evaluations"
log = logging.getLogger(__name__)


def eval_device(cfg: TrainConfig) -> torch.device:
    return World.from_env(cfg.device).device


def dataset_decoder(cfg: TrainConfig, device: torch.device) -> Decoder:
    """The decoder of the autoencoder the run's dataset was encoded with (its manifest names it)."""
    require_images(cfg)
    from dtr_scale.data.loader import read_manifest
    from dtr_scale.models.autoencoders import load_autoencoder

    return load_autoencoder(read_manifest(cfg.data.path)["autoencoder"], device=str(device)).decode


def score_samples(images: np.ndarray, labels: np.ndarray, cfg: TrainConfig, protocol: str = "full") -> dict[str, Any]:
    """The metrics of a sample batch: the ADM suite against eval.reference (FID alone under the
    quick protocol), else the digits scores."""
    if cfg.eval.reference:
        return adm_scores(images, cfg.eval.reference, cfg.eval.inception, eval_device(cfg), cfg.eval.batch_size,
                          full=protocol == "full", pr_arithmetic=cfg.eval.pr_arithmetic)
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
               device: torch.device | str = "cpu", batch_size: int = 64, *, full: bool = True,
               pr_arithmetic: str = "adm") -> dict[str, Any]:
    """FID, sFID, IS, precision, recall (k = 3) of `images` against an ADM reference batch, as
    ADM's evaluator computes them; FID alone unless `full`. Precomputed reference statistics are
    used where the batch has them; precision/recall need its images (arr_0) and are None without."""
    from dtr_scale.eval.features import InceptionFeatures
    from dtr_scale.eval.metrics import (feature_statistics, frechet_distance, has_pool_statistics, inception_score,
                                        load_reference_batch, precision_recall)

    net = InceptionFeatures(inception).to(device)
    fake = net.extract(images, batch_size)
    ref = load_reference_batch(reference, images=full or not has_pool_statistics(reference))
    if not full:  # FID alone: the stored statistics, else the reference images' features
        mu, sigma = (ref.mu, ref.sigma) if ref.mu is not None else feature_statistics(net.extract(ref.images, batch_size)["pool"])
        return {"fid": frechet_distance(*feature_statistics(fake["pool"]), mu, sigma), "num_samples": int(len(images))}
    real = net.extract(ref.images, batch_size) if ref.images is not None else None
    mu, sigma = (ref.mu, ref.sigma) if ref.mu is not None else feature_statistics(real["pool"])
    mu_s, sigma_s = (ref.mu_s, ref.sigma_s) if ref.mu_s is not None else (
        feature_statistics(real["spatial"]) if real is not None else (None, None))
    precision, recall = (precision_recall(real["pool"], fake["pool"], device=device, arithmetic=pr_arithmetic)
                         if real is not None else (None, None))
    return {"fid": frechet_distance(*feature_statistics(fake["pool"]), mu, sigma),
            "sfid": frechet_distance(*feature_statistics(fake["spatial"]), mu_s, sigma_s) if mu_s is not None else None,
            "inception_score": inception_score(fake["logits"]), "precision": precision, "recall": recall,
            "pr_arithmetic": pr_arithmetic if precision is not None else None, "num_samples": int(len(images))}


def evaluate_averaging(checkpoint: str | Path, averaging: str, cfg: TrainConfig, *, protocol: str = "full",
                       rank: int = 0, world_size: int = 1, progress: bool = False) -> dict[str, Any] | None:
    """Score one averaging of one checkpoint under `protocol` (full | quick); the record on rank 0,
    None on the other ranks. Sampling resumes from the chunks already in the samples folder. The
    record carries the protocol and what training had spent up to the checkpoint (time to FID)."""
    opened = open_checkpoint(checkpoint, verify=False)
    run_dir, step, settings = opened.run_dir, opened.step, EvalSettings.of(cfg, protocol)
    done = find_result(run_dir, settings.result_key(step, averaging))
    if done is not None:
        log.info("step %d %s already evaluated (%s); not recomputing", step, averaging, run_dir / "eval")
        return done if rank == 0 else None
    preflight(cfg)
    start = time.perf_counter()
    require_complete(opened.path)
    model, run_cfg = averaged_model(opened, averaging,
                                    allow_missing_snapshots=cfg.eval.allow_missing_snapshots)
    device = eval_device(cfg)
    diffusion = build_diffusion(run_cfg).respaced(cfg.diffusion.sampling_steps, cfg.diffusion.sampler)
    npz = generate_samples(model, diffusion, settings.sample_spec(run_cfg.model, step, averaging),
                           settings.samples_folder(run_dir, step, averaging), dataset_decoder(cfg, device),
                           rank=rank, world_size=world_size, device=device, progress=progress)
    if npz is None:
        return None
    sampled = time.perf_counter()
    images, labels = load_samples(npz)
    metrics = score_samples(images, labels, cfg, protocol)
    cost = training_cost(run_dir, step, run_cfg.world_size)
    record = {"step": step, "averaging": averaging, **settings.record_fields(), **metrics,
              **(cost.record_fields() if cost is not None else {}),
              "checkpoint": str(checkpoint), "samples": str(npz), "sample_s": sampled - start,
              "metric_s": time.perf_counter() - sampled, "wall_s": time.perf_counter() - start,
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "provenance": collect_provenance()}
    stored = append_result(run_dir, record)
    if stored is not record:  # another evaluator stored this result first; its record stands
        return stored
    log_to_wandb(run_dir, cfg, [record])
    log_to_tensorboard(run_dir, cfg, [record])
    log.info("step %d %s: %s", step, averaging, {k: v for k, v in metrics.items() if v is not None})
    return record


def evaluate_checkpoint(checkpoint: str | Path, cfg: TrainConfig | None = None, *,
                        averaging: list[str] | None = None, protocol: str = "full", rank: int | None = None,
                        world_size: int | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """Evaluate `checkpoint` (RUN_DIR/checkpoints/step_N) for each averaging spec (default
    cfg.eval.averaging) under `protocol` and return the records (on rank 0; [] on the others).
    `cfg` holds the evaluation settings; None: the run's own config from the checkpoint.
    rank/world_size default to RANK/WORLD_SIZE: every rank samples its chunks, rank 0 merges and scores."""
    cfg = cfg if cfg is not None else open_checkpoint(checkpoint, verify=False).config
    rank, world_size = distributed_position(rank, world_size)
    records = []
    for spec in averaging or cfg.eval.averaging:
        record = evaluate_averaging(checkpoint, spec, cfg, protocol=protocol, rank=rank, world_size=world_size,
                                    progress=progress)
        if record is not None:
            records.append(record)
    return records
