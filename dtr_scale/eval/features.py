"""Feature networks for the metrics, one interface: `net.extract(images, batch_size)`.

`images` are uint8 [N, H, W, 3] (what the sampler writes and what ADM reference
batches hold); the result is a dict of float32 arrays:
  'pool'    [N, D]   features for Frechet distance and precision/recall
  'spatial' [N, Ds]  spatial features for sFID (Inception only)
  'logits'  [N, K]   class logits for Inception Score / class accuracy

Two networks: the FID Inception (torch-fidelity's TF1-exact port, weights
`pt_inception-2015-12-05` from a local file) and, for the embedded digits
default, a small CNN the project trains on the digits itself and caches.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dtr_scale.data.digits import DIGITS_NUM_CLASSES, load_digits_images
from dtr_scale.extras import import_extra

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# torch-fidelity's conversion of the TF 2015-12-05 graph; same tensors as pytorch-fid's pt_inception file
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
DIGITS_CLASSIFIER_FILENAME = "digits_classifier.pt"
SFID_CHANNELS = 7


def cache_dir() -> Path:
    """Where downloaded or generated evaluation weights live: $DTR_SCALE_CACHE or ~/.cache/dtr_scale."""
    return Path(os.environ.get("DTR_SCALE_CACHE", "~/.cache/dtr_scale")).expanduser()


def inception_weights_path(path: str | Path | None = None) -> Path:
    """The FID Inception weights file: `path`, else $DTR_SCALE_INCEPTION, else cache_dir()/INCEPTION_FILENAME."""
    if path is None:
        path = os.environ.get("DTR_SCALE_INCEPTION") or cache_dir() / INCEPTION_FILENAME
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {path}. Download {INCEPTION_URL} (the standard "
            f"pt_inception-2015-12-05 weights), save it as {cache_dir() / INCEPTION_FILENAME}, or set "
            f"DTR_SCALE_INCEPTION=/path/to/{INCEPTION_FILENAME} (or pass its path)."
        )
    return path


@contextmanager
def full_fp32() -> Iterator[None]:
    """TF32 off for matmuls and convolutions inside, the caller's settings restored after: the
    training backend may have turned TF32 on, and ADM's features (SPEC section 6) are fp32."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


class FeatureNetwork(nn.Module):
    """forward(uint8 [B, 3, H, W]) -> dict of float tensors; extract() runs it over a whole set,
    in full fp32 whatever TF32 setting the process has."""

    @torch.no_grad()
    def extract(self, images: np.ndarray, batch_size: int = 64) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"feature extraction takes uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
        device = next(self.parameters()).device
        self.eval()
        parts: dict[str, list[np.ndarray]] = {}
        with full_fp32():
            for start in range(0, len(images), batch_size):
                batch = torch.from_numpy(images[start:start + batch_size]).to(device).permute(0, 3, 1, 2)
                for name, value in self(batch).items():
                    parts.setdefault(name, []).append(value.float().cpu().numpy())
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}


class InceptionFeatures(FeatureNetwork):
    """The FID Inception-v3 (torch-fidelity's port of the TF graph ADM uses, with its
    TF1-exact bilinear resize to 299). 'pool' = pool_3 (2048), 'logits' = the 1008 logits
    without bias (ADM's softmax/logits/MatMul, torch-fidelity's 'logits_unbiased'),
    'spatial' = first 7 channels of mixed_6/conv, i.e. Mixed_6d.branch1x1 after its ReLU
    (17x17x7 = 2023, flattened in TF's NHWC order so ADM's stored mu_s/sigma_s apply).
    torch-fidelity does not expose mixed_6/conv; a forward hook on that module takes it.

    torch-fidelity unpickles a weights file with weights_only=False, which runs any code in it;
    the file is read here with weights_only=True (or as safetensors) and torch-fidelity gets an
    in-memory copy of the plain tensors (its loader accepts a file object)."""

    def __init__(self, weights_path: str | Path | None = None) -> None:
        super().__init__()
        FeatureExtractorInceptionV3 = import_extra(
            "torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3

        from dtr_scale.models.weights import load_state_dict_file

        path = inception_weights_path(weights_path)
        state_dict = load_state_dict_file(path, what="FID Inception weights")
        tensors_only = io.BytesIO()
        torch.save(state_dict, tensors_only)
        tensors_only.seek(0)
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=tensors_only)
        except (RuntimeError, KeyError) as err:  # a different network's tensors
            raise RuntimeError(f"{path} does not hold the FID Inception weights ({type(err).__name__}: {err}); "
                               f"re-download {INCEPTION_URL}") from err

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        captured: list[torch.Tensor] = []
        handle = self.net.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            pool, logits = self.net(images)
        finally:
            handle.remove()
        return {"pool": pool, "spatial": sfid_features(captured[0]), "logits": logits}


def sfid_features(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    # ADM evaluator: mixed_6/conv[..., :7] of the NHWC tensor, flattened per image
    return mixed_6_conv[:, :SFID_CHANNELS].permute(0, 2, 3, 1).reshape(len(mixed_6_conv), -1).float()


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
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save({"settings": settings, "state_dict": net.state_dict(), "test_accuracy": accuracy}, tmp)
    os.replace(tmp, path)  # atomic: concurrent evaluators never read half a file
    net.test_accuracy = accuracy
    return net.eval().requires_grad_(False)
