"""Scores for samples of the embedded digits: Fréchet distance in the features of the
project's digits classifier ("digits-FD") and the class accuracy of conditional samples.

The classifier is a small CNN trained here on the digits' training split with a fixed
seed (a few seconds on a CPU) and cached in cache_dir(); a cache made with other settings
is retrained.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dtr_scale.data.digits import DIGITS_NUM_CLASSES, load_digits_images
from dtr_scale.eval.features import FeatureNetwork, cache_dir
from dtr_scale.eval.metrics import class_accuracy, feature_statistics, frechet_distance
from dtr_scale.io import atomic_write

DIGITS_CLASSIFIER_FILENAME = "digits_classifier.pt"
FLOOR_SPLITS = 10  # random halvings averaged for digits-FD's floor (one halving varies by about +-25%)


class DigitsClassifier(FeatureNetwork):
    """Small CNN on the embedded digits: 'pool' = its 64-d penultimate layer (before the
    ReLU, so no dead dimensions make the covariance singular), 'logits' = 10 classes."""

    def __init__(self, image_size: int = 16, feature_dim: int = 64, num_classes: int = DIGITS_NUM_CLASSES) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"digits classifier image_size must be a multiple of 4, got {image_size}")
        self.image_size = image_size
        self.test_accuracy: float | None = None  # held-out accuracy, set when trained or loaded
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (image_size // 4) ** 2, feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"digits classifier takes uint8 images [B, 3, {self.image_size}, {self.image_size}], "
                             f"got {images.dtype} {tuple(images.shape)}; sample at the size it was trained on")
        pool = self.body(images.float() / 127.5 - 1.0)
        return {"pool": pool, "logits": self.head(pool)}


def digits_split(num_images: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out test indices): a fixed random split of the digits."""
    order = np.random.default_rng(seed).permutation(num_images)
    num_test = int(round(num_images * test_fraction))
    return np.sort(order[num_test:]), np.sort(order[:num_test])


def train_digits_classifier(image_size: int = 16, seed: int = 0, epochs: int = 15, batch_size: int = 64,
                            lr: float = 2e-3) -> tuple[DigitsClassifier, float]:
    """Train on the digits' training split with a fixed seed (CPU, a few seconds);
    returns the classifier and its held-out test accuracy."""
    images, labels = load_digits_images(size=image_size)
    train_idx, test_idx = digits_split(len(images), seed=seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitsClassifier(image_size)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small run no faster on more threads, and much slower on a busy CPU
    try:
        for _ in range(epochs):
            order = torch.from_numpy(train_idx)[torch.randperm(len(train_idx), generator=generator)]
            for batch in order.split(batch_size):
                loss = F.cross_entropy(net(x[batch])["logits"], y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    with torch.no_grad():
        predictions = net(x[test_idx])["logits"].argmax(dim=1)
    return net, float((predictions == y[test_idx]).double().mean())


def load_digits_classifier(path: str | Path | None = None, image_size: int = 16, seed: int = 0) -> DigitsClassifier:
    """The digits feature network, trained once and cached at `path` (default
    cache_dir()/digits_classifier.pt); a cache made with other settings is retrained.
    Its held-out accuracy is in `.test_accuracy`."""
    path = Path(path).expanduser() if path is not None else cache_dir() / DIGITS_CLASSIFIER_FILENAME
    settings = {"image_size": image_size, "seed": seed, "version": 1}
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise RuntimeError(f"cannot read the cached digits classifier {path} ({err}); delete it to retrain") from err
        if saved.get("settings") == settings:
            net = DigitsClassifier(image_size)
            net.load_state_dict(saved["state_dict"])
            net.test_accuracy = saved["test_accuracy"]
            return net.eval().requires_grad_(False)
    net, accuracy = train_digits_classifier(image_size, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: concurrent evaluators never read half a file
    atomic_write(path, lambda f: torch.save({"settings": settings, "state_dict": net.state_dict(),
                                             "test_accuracy": accuracy}, f))
    net.test_accuracy = accuracy
    return net.eval().requires_grad_(False)


def half_split_fd(features: np.ndarray, splits: int = FLOOR_SPLITS, seed: int = 0) -> float:
    """digits-FD's floor: the FD between two disjoint random halves of the real digits' features,
    averaged over `splits` halvings. Real digits against real digits score this much, so a model's
    digits-FD means something only beside it."""
    rng = np.random.default_rng(seed)
    distances = []
    for _ in range(splits):
        half_a, half_b = np.array_split(rng.permutation(len(features)), 2)
        distances.append(frechet_distance(*feature_statistics(features[half_a]),
                                          *feature_statistics(features[half_b])))
    return float(np.mean(distances))


def digits_scores(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """images: uint8 [N, 16, 16, 3] samples drawn for `labels`; against all 1,797 real digits.
    `digits_fd_floor` is the same distance between two halves of the real digits (half_split_fd)."""
    net = load_digits_classifier()
    real, _ = load_digits_images(size=images.shape[1])
    fake_out, real_out = net.extract(images), net.extract(real)
    fd = frechet_distance(*feature_statistics(fake_out["pool"]), *feature_statistics(real_out["pool"]))
    return {"digits_fd": float(fd), "class_accuracy": float(class_accuracy(fake_out["logits"], labels)),
            "digits_fd_floor": half_split_fd(real_out["pool"]), "num_samples": int(len(images))}
