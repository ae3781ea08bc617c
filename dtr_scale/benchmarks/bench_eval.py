"""The evaluator's costs on this machine, for the embedded digits default (configs/train.yaml:
tiny DiT + DTR, 4 x 8 x 8 latents, DDPM 50 steps, CFG 1.5, 500 samples in batches of 250).

    python -m dtr_scale.benchmarks.bench_eval [--images 8192] [--batch-sizes 64 256 1024] [--sample-images 250]
                                    [--threads N] [--skip-full] [--cache PATH]
    dtr-bench eval [same options]

(a) sampling: images/s of the evaluator's sampler (per-index noise, decode, chunk files),
    and of the plain sampler (one generator for the batch) for comparison;
(b) feature extraction: images/s of the digits classifier, and of the FID Inception when
    its weights file is present (see dtr_scale.eval.features);
(c) a full evaluation of one checkpoint (weights -> 500 samples -> digits-FD), wall time.

The checkpoint is a 2-step run of the default config (sampling cost does not depend on
the weights). Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dtr_scale.configs import CONFIG_DIR
from dtr_scale.data.digits import load_digits_images
from dtr_scale.eval.digits import load_digits_classifier
from dtr_scale.eval.features import FeatureNetwork, InceptionFeatures


def images_per_second(net: FeatureNetwork, images: np.ndarray, batch_size: int, repeats: int = 3) -> float:
    """Best of `repeats` timed passes after one warm-up batch."""
    net.extract(images[:batch_size], batch_size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        net.extract(images, batch_size)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def default_config(work: Path, overrides: list[str]):
    """configs/train.yaml as `dtr-train` composes it, with its run and data under `work`."""
    from hydra import compose, initialize_config_dir

    from dtr_scale.config import to_train_config

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = compose("train", overrides=[f"run_dir={work / 'run'}", f"data.path={work / 'digits'}",
                                          "logging.wandb=disabled", "sample_at_end=0", *overrides])
    return to_train_config(raw)


def trained_checkpoint(work: Path) -> tuple[Path, object]:
    """A 2-step run of the default config: (its checkpoint, its config)."""
    from dtr_scale.data_prep.digits import prepare_digits
    from dtr_scale.train.checkpoint import latest_checkpoint
    from dtr_scale.train.loop import train

    cfg = default_config(work, ["steps=2", "checkpoint.every=2", "~cluster", "world_size=1"])
    prepare_digits(cfg.data.path, format=cfg.data.format)
    train(cfg)
    return latest_checkpoint(cfg.run_dir), cfg


def bench_sampling(checkpoint: Path, cfg, num_images: int, work: Path) -> None:
    from dtr_scale.diffusion.sampling import sample_latents
    from dtr_scale.eval.evaluate import dataset_decoder
    from dtr_scale.eval.generate import generate_chunks
    from dtr_scale.eval.sample import load_model
    from dtr_scale.eval.settings import EvalSettings
    from dtr_scale.train.components import build_diffusion

    model, run_cfg = load_model(checkpoint)
    d = cfg.diffusion
    diffusion = build_diffusion(run_cfg).respaced(d.sampling_steps)
    spec = dataclasses.replace(EvalSettings.of(cfg).sample_spec(run_cfg.model, 0, "bench"), num_samples=num_images)
    decode = dataset_decoder(cfg, torch.device("cpu"))
    start = time.perf_counter()
    generate_chunks(model, diffusion, spec, work / "samples", decode)
    seconds = time.perf_counter() - start
    print(f"sampling, evaluator ({d.sampler} {d.sampling_steps} steps, cfg {d.cfg_scale}, chunks of "
          f"{spec.chunk_size}): {num_images / seconds:8.1f} images/s  ({num_images} images in {seconds:.1f} s)")
    labels = torch.arange(num_images) % run_cfg.model.num_classes
    start = time.perf_counter()
    for batch in labels.split(spec.chunk_size):
        sample_latents(model, diffusion, batch, shape=spec.latent_shape, cfg_scale=d.cfg_scale, sampler=d.sampler,
                       generator=torch.Generator().manual_seed(0))
    seconds = time.perf_counter() - start
    print(f"sampling, plain sample_latents (one generator, no decode):      {num_images / seconds:8.1f} images/s")


def bench_features(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    net = load_digits_classifier(args.cache)
    print(f"digits classifier ready in {time.perf_counter() - start:.2f} s "
          f"(held-out accuracy {net.test_accuracy:.4f}; trains only when not cached)")
    digits, _ = load_digits_images(size=16)
    images = np.resize(digits, (args.images, *digits.shape[1:]))
    for batch_size in args.batch_sizes:
        rate = images_per_second(net, images, batch_size)
        print(f"features, digits classifier 16x16, batch {batch_size:5d}: {rate:10.0f} images/s")
    try:
        inception = InceptionFeatures()
    except FileNotFoundError as err:
        print(f"FID Inception skipped: {str(err).splitlines()[0]}")
        return
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.inception_images, 256, 256, 3), dtype=np.uint8)
    rate = images_per_second(inception, images, batch_size=min(32, args.inception_images), repeats=1)
    print(f"features, FID Inception 256->299, batch {min(32, args.inception_images):5d}: {rate:10.1f} images/s")


def bench_full_evaluation(checkpoint: Path, cfg) -> None:
    from dtr_scale.eval.evaluate import evaluate_checkpoint

    start = time.perf_counter()
    [record] = evaluate_checkpoint(checkpoint, cfg, averaging=["ema"])
    seconds = time.perf_counter() - start
    print(f"full evaluation of one checkpoint ({record['num_samples']} samples, ema): {seconds:.1f} s wall "
          f"(weights + sampling {record['sample_s']:.1f} s, metrics {record['metric_s']:.1f} s); "
          f"digits-FD {record['digits_fd']:.1f} of a 2-step model")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8192, help="digits images per timed feature pass")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--sample-images", type=int, default=250, help="images per timed sampling pass")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-full", action="store_true", help="skip (c), the full evaluation")
    parser.add_argument("--cache", default=None, help="digits classifier file (default: the evaluator's cache)")
    parser.add_argument("--inception-images", type=int, default=32, help="images per pass for the Inception, if its weights exist")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    with tempfile.TemporaryDirectory(prefix="bench_eval-") as tmp:
        work = Path(tmp)
        checkpoint, cfg = trained_checkpoint(work)
        bench_sampling(checkpoint, cfg, args.sample_images, work)
        bench_features(args)
        if not args.skip_full:
            bench_full_evaluation(checkpoint, cfg)


if __name__ == "__main__":
    main()
