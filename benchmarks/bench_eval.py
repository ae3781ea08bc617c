"""Feature-extraction throughput of the evaluator's feature networks on this machine.

    python -m benchmarks.bench_eval [--images 8192] [--batch-sizes 64 256 1024] [--cache PATH]
    dtr-bench eval [same options]

The digits classifier (the embedded default) is always measured; the FID
Inception only when its weights file is present (see dtr_scale.eval.features).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from dtr_scale.data.digits import load_digits_images
from dtr_scale.eval.features import FeatureNetwork, InceptionFeatures, load_digits_classifier


def images_per_second(net: FeatureNetwork, images: np.ndarray, batch_size: int, repeats: int = 3) -> float:
    """Best of `repeats` timed passes after one warm-up batch."""
    net.extract(images[:batch_size], batch_size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        net.extract(images, batch_size)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8192, help="digits images per timed pass")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--cache", default=None, help="digits classifier file (default: the evaluator's cache)")
    parser.add_argument("--inception-images", type=int, default=32, help="images per pass for the Inception, if its weights exist")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")

    start = time.perf_counter()
    net = load_digits_classifier(args.cache)
    print(f"digits classifier ready in {time.perf_counter() - start:.2f} s "
          f"(held-out accuracy {net.test_accuracy:.4f}; trains only when not cached)")
    digits, _ = load_digits_images(size=16)
    images = np.resize(digits, (args.images, *digits.shape[1:]))
    for batch_size in args.batch_sizes:
        rate = images_per_second(net, images, batch_size)
        print(f"digits classifier 16x16, batch {batch_size:5d}: {rate:10.0f} images/s")

    try:
        inception = InceptionFeatures()
    except FileNotFoundError as err:
        print(f"FID Inception skipped: {str(err).splitlines()[0]}")
        return
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.inception_images, 256, 256, 3), dtype=np.uint8)
    rate = images_per_second(inception, images, batch_size=min(32, args.inception_images), repeats=1)
    print(f"FID Inception 256->299, batch {min(32, args.inception_images):5d}: {rate:10.1f} images/s")


if __name__ == "__main__":
    main()
