"""Data pipeline throughput: the shard loader (MDS and webdataset) and the pixel-autoencoder encode path.

    python -m dtr_scale.benchmarks.bench_data [--samples 4096] [--workers 2] [--batch 256]

Loader: 4 x 32 x 32 latents stored as posterior mean + std in fp16 (the ImageNet-256 layout), read with
fresh noise and flips, in batches of `--batch`. Target on a 2-core machine: >= 10,000 samples/s.
Encode: the digits through the pixel autoencoder, the encoder alone and the whole prep (decode, crop,
encode, write) end to end. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import numpy as np
import torch

from dtr_scale.models.autoencoders import PixelAutoencoder
from dtr_scale.data_prep.digits import prepare_digits
from dtr_scale.data_prep.merge import merge
from dtr_scale.data_prep.prepare import PrepSettings, encode_with_flip, prepare
from dtr_scale.data_prep.sources import ArraySource
from dtr_scale.data.loader import build_shard_loader
from dtr_scale.extras import import_extra


class NoisyPixelAutoencoder(PixelAutoencoder):
    """The pixel autoencoder with a non-zero posterior std, so the loader's noise path is exercised."""

    id = "pixel-noisy-bench"

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, _ = super().encode(images)
        return mean, torch.full_like(mean, 0.1)


def make_latent_dataset(out: str, fmt: str, num_samples: int) -> None:
    """num_samples random 64 x 64 images -> 4 x 32 x 32 latents (mean + std, fp16)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(num_samples, 64, 64, 3), dtype=np.uint8)
    source = ArraySource("bench", images, rng.integers(0, 1000, num_samples), [str(c) for c in range(1000)])
    prepare(source, out, NoisyPixelAutoencoder(), PrepSettings(format=fmt, resolution=64), batch_size=256,
            progress=False)
    merge(out)


def cpu_seconds() -> float:
    """CPU time of this process and its live children (the loader's workers)."""
    me = import_extra("psutil").Process()  # the [bench] extra
    return sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)])


def loader_throughput(path: str, fmt: str, batch: int, workers: int, steps: int) -> tuple[float, float]:
    """(samples/s by the wall clock, CPU microseconds per sample over all processes)."""
    loader = build_shard_loader(path, format=fmt, global_batch_size=batch, rank=0, world_size=1, seed=0,
                                num_workers=workers)
    for _ in range(2 * max(workers, 1)):  # start the workers and fill their prefetch queues
        next(loader)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    for _ in range(steps):
        latents, labels = next(loader)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    assert latents.shape == (batch, 4, 32, 32)
    loader.close()
    return steps * batch / seconds, cpu / (steps * batch) * 1e6


def encode_throughput(repeats: int = 20) -> float:
    """Images/s of the pixel encoder on one thread: such small ops gain nothing from torch's thread pool,
    and on a busy machine the pool makes the figure swing by an order of magnitude."""
    images = np.random.default_rng(0).integers(0, 256, size=(256, 16, 16, 3), dtype=np.uint8)
    autoencoder = PixelAutoencoder()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encode_with_flip(autoencoder, images)
        started = time.perf_counter()
        for _ in range(repeats):
            encode_with_flip(autoencoder, images)
        return repeats * len(images) / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("mds", "webdataset"):
            path = f"{tmp}/{fmt}"
            make_latent_dataset(path, fmt, args.samples)
            rate, cpu_us = loader_throughput(path, fmt, args.batch, args.workers, args.steps)
            # On a busy machine the wall-clock rate understates the loader; CPU time per sample does not.
            print(f"loader {fmt:<10}  4x32x32 fp16 mean+std  {args.workers} workers  batch {args.batch}: "
                  f"{rate:,.0f} samples/s  ({cpu_us:.0f} CPU-us/sample: {os.cpu_count()} idle cores would "
                  f"give ~{os.cpu_count() * 1e6 / cpu_us:,.0f} samples/s)")
        print(f"encode pixel      16x16 RGB -> 4x8x8, with flip, 1 thread: {encode_throughput():,.0f} images/s")
        started = time.perf_counter()
        manifest = prepare_digits(f"{tmp}/digits")
        seconds = time.perf_counter() - started
        print(f"prep digits       end to end (decode, crop, encode, write, merge): "
              f"{manifest['num_source_images'] / seconds:,.0f} images/s ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
