"""Feature networks for the metrics, one interface: `net.extract(images, batch_size)`.

`images` are uint8 [N, H, W, 3] (what the sampler writes and what ADM reference
batches hold); the result is a dict of float32 arrays:
  'pool'    [N, D]   features for Frechet distance and precision/recall
  'spatial' [N, Ds]  spatial features for sFID (Inception only)
  'logits'  [N, K]   class logits for Inception Score / class accuracy

The FID Inception lives here (torch-fidelity's TF1-exact port, weights
`pt_inception-2015-12-05` from a local file); the embedded digits' own feature
network, a small CNN the project trains and caches, is in dtr_scale.eval.digits.
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

from dtr_scale.extras import import_extra

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# torch-fidelity's conversion of the TF 2015-12-05 graph; same tensors as pytorch-fid's pt_inception file
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
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
