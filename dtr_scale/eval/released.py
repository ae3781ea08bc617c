"""Any DiT weights, not only a run's checkpoints: the model they fit, and its evaluation.

    PATH                                   the model                       results in
    RUN/checkpoints/step_N (or RUN)        the checkpoint's EMA, own config RUN/eval (as `dtr-scale eval`)
    weights.pt / weights.safetensors       model=... of `cfg`, strict load  cfg.run_dir/eval

A weights file holds the official DiT names: a released `DiT-XL-2-256x256.pt` (a plain
state dict), a DiT training checkpoint (its "ema"), or `dtr-scale export`'s safetensors.
It is read without running code from it (dtr_scale.models.weights). Sampling, metrics and
the results files are a run's: the same SampleSpec, scores and results.jsonl records,
with step 0 and averaging "file:NAME".
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dtr_scale.config import TrainConfig
from dtr_scale.eval.evaluate import dataset_decoder, eval_device, evaluate_checkpoint, preflight, score_samples
from dtr_scale.eval.generate import Decoder, distributed_position, generate_samples, load_samples
from dtr_scale.eval.results import append_result, find_result, log_to_wandb, read_results, write_report
from dtr_scale.eval.sample import load_model
from dtr_scale.eval.settings import EvalSettings
from dtr_scale.models import DiT
from dtr_scale.models.weights import dit_state_dict, load_dit_weights
from dtr_scale.train.checkpoint import latest_checkpoint
from dtr_scale.train.components import build_diffusion, build_model

log = logging.getLogger(__name__)


def run_checkpoint(path: Path) -> Path | None:
    """The checkpoint directory `path` names (a checkpoint, or a run's latest), or None for a file."""
    if path.is_file():
        return None
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path} has no complete checkpoint to evaluate")
        return latest
    if path.is_dir():
        return path
    raise FileNotFoundError(f"weights {path} not found: pass a .pt or .safetensors file, a checkpoint directory "
                            "(RUN/checkpoints/step_N) or a run directory")


def model_from_weights(weights: str | Path, cfg: TrainConfig) -> tuple[DiT, TrainConfig]:
    """The model (eval mode, CPU) with `weights`, and the config it was built from: a checkpoint's
    own config, or `cfg` (its model, routing and diffusion) for a weights file."""
    path = Path(weights).expanduser()
    checkpoint = run_checkpoint(path)
    if checkpoint is not None:
        return load_model(checkpoint, use_ema=True)
    # Read (and refused if missing, foreign or unsafe) before the model is built: DiT-XL/2 takes ~12 s.
    state = dit_state_dict(path)
    return load_dit_weights(build_model(cfg, load_init=False), path, state).eval(), cfg


def weights_decoder(cfg: TrainConfig, device: torch.device, autoencoder: str | None = None) -> Decoder:
    """The decoder of `autoencoder` (pixel, sd-vae-ft-ema, ...), else of the one cfg.data's shards
    were encoded with."""
    from dtr_scale.models.autoencoders import load_autoencoder

    if autoencoder:
        return load_autoencoder(autoencoder, device=str(device)).decode
    try:
        return dataset_decoder(cfg, device)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"which autoencoder decodes these latents? ({err}) Name it: autoencoder=sd-vae-ft-ema for "
                         "the released DiT weights, autoencoder=pixel for digits-sized models") from err


def evaluate_weights(weights: str | Path, cfg: TrainConfig, *, autoencoder: str | None = None,
                     rank: int | None = None, world_size: int | None = None,
                     progress: bool = False) -> list[dict[str, Any]]:
    """Score `weights` with cfg's sampler and metrics (eval.reference, eval.inception, ...); the
    records (rank 0; [] elsewhere). A checkpoint is evaluated as `dtr-scale eval` does, into its
    run; a weights file into cfg.run_dir/eval (samples, results.jsonl), once per settings."""
    path = Path(weights).expanduser()
    checkpoint = run_checkpoint(path)
    if checkpoint is not None:
        return evaluate_checkpoint(checkpoint, cfg, averaging=["ema"], rank=rank, world_size=world_size,
                                   progress=progress)
    rank, world_size = distributed_position(rank, world_size)
    out_dir, averaging, settings = Path(cfg.run_dir), f"file:{path.name}", EvalSettings.of(cfg)
    done = find_result(out_dir, settings.result_key(0, averaging))
    if done is not None:
        log.info("%s already evaluated with these settings (%s); not recomputing", path, out_dir / "eval")
        return [done] if rank == 0 else []
    start = time.perf_counter()
    model, _ = model_from_weights(path, cfg)
    device = eval_device(cfg)
    diffusion = build_diffusion(cfg).respaced(cfg.diffusion.sampling_steps, cfg.diffusion.sampler)
    npz = generate_samples(model, diffusion, settings.sample_spec(cfg.model, 0, averaging),
                           settings.samples_folder(out_dir, 0, averaging), weights_decoder(cfg, device, autoencoder),
                           rank=rank, world_size=world_size, device=device, progress=progress)
    if npz is None:
        return []
    sampled = time.perf_counter()
    images, labels = load_samples(npz)
    metrics = score_samples(images, labels, cfg)
    record = {"step": 0, "averaging": averaging, **settings.record_fields(), **metrics, "weights": str(path),
              "samples": str(npz), "sample_s": sampled - start, "metric_s": time.perf_counter() - sampled,
              "wall_s": time.perf_counter() - start, "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    record = append_result(out_dir, record)
    log_to_wandb(out_dir, cfg, [record])
    log.info("%s: %s", path, {k: v for k, v in metrics.items() if v is not None})
    return [record]


def evaluate_weights_command(cfg: TrainConfig, weights: str | Path, autoencoder: str | None = None,
                             progress: bool = True) -> list[dict[str, Any]]:
    """`dtr-scale eval --weights PATH`: check the metric files first, evaluate, rewrite the
    report (cfg.run_dir/eval/results.md and results.png); the records."""
    preflight(cfg)
    records = evaluate_weights(weights, cfg, autoencoder=autoencoder, progress=progress)
    run_checkpoint_dir = run_checkpoint(Path(weights).expanduser())
    report_dir = run_checkpoint_dir.parent.parent if run_checkpoint_dir is not None else Path(cfg.run_dir)
    if read_results(report_dir):
        table, plot = write_report(report_dir)
        log.info("evaluation results in %s and %s:\n%s", table, plot, table.read_text())
    return records
