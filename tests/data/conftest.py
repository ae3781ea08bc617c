import numpy as np
import pytest
import torch

from dtr_scale.models.autoencoders import PixelAutoencoder
from dtr_scale.data_prep.merge import merge
from dtr_scale.data_prep.prepare import PrepSettings, prepare
from dtr_scale.data_prep.sources import ArraySource


class NoisyPixel(PixelAutoencoder):
    """A pixel autoencoder whose posterior has std 0.5, so loaded latents carry the sampled noise."""

    id = "pixel-noisy-test"

    def encode(self, images):
        mean, _ = super().encode(images)
        return mean, torch.full_like(mean, 0.5)


def _prepare(root, images, autoencoder, fmt, shard_size):
    labels = np.arange(len(images)) % 10
    source = ArraySource("test", images, labels, [str(c) for c in range(10)])
    out = str(root / fmt)
    prepare(source, out, autoencoder, PrepSettings(format=fmt, resolution=8, shard_size=shard_size), progress=False)
    merge(out)
    return out


@pytest.fixture(scope="session")
def identity_datasets(tmp_path_factory):
    """{format: path} of 200 samples whose latent is the constant i / 127.5 - 1 for sample i (std 0)."""
    images = np.repeat(np.arange(200, dtype=np.uint8), 8 * 8 * 3).reshape(200, 8, 8, 3)
    root = tmp_path_factory.mktemp("identity")
    return {fmt: _prepare(root, images, PixelAutoencoder(), fmt, 64) for fmt in ("mds", "webdataset")}


@pytest.fixture(scope="session")
def noisy_datasets(tmp_path_factory):
    """{format: path} of 64 random images with posterior std 0.5, in 3 chunks."""
    images = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
    root = tmp_path_factory.mktemp("noisy")
    return {fmt: _prepare(root, images, NoisyPixel(), fmt, 24) for fmt in ("mds", "webdataset")}
