"""Sample-quality metrics of the ADM evaluation suite (SPEC section 6), on features.

Every metric here is a pure function of feature arrays, so the same code scores
Inception features (FID, sFID, IS, precision/recall on ImageNet) and the
embedded digits classifier's features (digits-FD, class accuracy). Where the
ADM evaluator (guided-diffusion `evaluations/evaluator.py`) makes a choice,
the choice is kept, so numbers compare with published ones.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import scipy.special
import torch

from dtr_scale.eval.features import full_fp32

ADM_REFERENCE_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz"


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # FID's Gaussian fit (Heusel et al. 2017): mean and unbiased covariance, as ADM's np.cov
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature statistics need features [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _sqrtm(product: np.ndarray) -> np.ndarray:
    """scipy's sqrtm without its warning on a singular product (fewer samples than feature
    dimensions), as ADM calls it (disp=False, which scipy 1.16 deprecates): the result is
    judged by finiteness and its imaginary part below, as there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(product)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, eq. 6):
    |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), computed as ADM does:
    if the square root is not finite, retry with eps*I added to both covariances; a small
    imaginary part from numerical error is dropped, a large one is an error."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"Gaussian statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}; both sides must come from the same feature layer")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"Frechet distance: sqrtm of the covariance product is not finite; adding {eps} to the diagonals",
                      RuntimeWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: sqrtm has an imaginary component of {np.abs(covmean.imag).max():.3g}; "
                             "the covariances are not positive semi-definite (check the features for NaN or too few samples)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over
    consecutive chunks of `split_size` samples, the last one possibly shorter, as ADM's
    `compute_inception_score` does (10 chunks at 50K; 1 at 1,050). Takes logits; pass
    log-probabilities to score probabilities."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] < 1 or split_size < 1:
        raise ValueError(f"inception score needs logits [N >= 1, classes] and split_size >= 1, "
                         f"got shape {logits.shape} and split_size={split_size}")
    scores = [split_inception_score(logits[start:start + split_size]) for start in range(0, len(logits), split_size)]
    return float(np.mean(scores))


def split_inception_score(logits: np.ndarray) -> float:
    # IS of one chunk: exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y))), p(y) = mean_x p(y|x)
    log_p = scipy.special.log_softmax(logits, axis=1)
    log_marginal = scipy.special.logsumexp(log_p, axis=0) - np.log(len(log_p))
    return float(np.exp(np.mean(np.sum(np.exp(log_p) * (log_p - log_marginal), axis=1))))


PR_BLOCK = 10_000  # ADM ManifoldEstimator's row_batch_size = col_batch_size: its float32 fallback is per block
PR_ARITHMETIC = ("adm", "exact")


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def adm_squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[len(u), len(v)] squared distances as ADM's DistanceBlock (guided-diffusion
    evaluations/evaluator.py) computes them: max(|u|^2 - 2 u.v + |v|^2, 0) from float16 features,
    each operation's result rounded to float16, the matmul and the norms accumulated in float32
    (cuBLAS / TF GPU reductions); the whole block again in float32 if any value is not finite.
    Each float16 operation is done in float32 and rounded once: float32 holds every sum and
    product of two float16 numbers closely enough that this equals the float16 operation."""
    u16, v16 = _fp16(u), _fp16(v)
    norm_u, norm_v = _fp16(_fp16(u16 * u16).sum(1)), _fp16(_fp16(v16 * v16).sum(1))
    twice_dot = _fp16(2 * _fp16(u16 @ v16.T))  # may overflow to inf, as in float16
    d16 = _fp16(_fp16(norm_u[:, None] - twice_dot) + norm_v[None, :]).clamp_min(0)  # -inf clamps to 0, as ADM
    if torch.isfinite(d16).all():
        return d16
    return exact_squared_distances(u.float(), v.float())


def exact_squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # ADM's float32 fallback formula, in the features' own precision (float64 for arithmetic="exact")
    return (u.square().sum(1)[:, None] - 2 * (u @ v.T) + v.square().sum(1)[None, :]).clamp_min(0)


def manifold_radii(features: torch.Tensor, k: int, distances: Callable, block: int) -> torch.Tensor:
    # Kynkaanniemi et al. 2019, eq. 2, as ADM's manifold_radii: the (k+1)-th smallest squared
    # distance of each row to all points, itself included (so a point's k-th nearest other one)
    if len(features) <= k:
        raise ValueError(f"a k={k} nearest-neighbour manifold needs more than {k} points, got {len(features)}")
    return torch.cat([torch.cat([distances(rows, cols) for cols in features.split(block)], dim=1)
                      .kthvalue(k + 1, dim=1).values for rows in features.split(block)])


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, k: int = 3, batch_size: int = PR_BLOCK,
                     device: str | torch.device = "cpu", arithmetic: str = "adm") -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), k = 3, as ADM's ManifoldEstimator:
    precision is the share of fake samples inside the real k-NN manifold (a squared distance <=
    some real point's radius), recall the share of real samples inside the fake one; blocks of
    batch_size rows and columns, distances of (real block, fake block) computed once for both.
    arithmetic="adm" (default) reproduces ADM's float16 distances, whose rounding makes near
    ties count as inside; "exact" computes them in float64. TF32 stays off throughout."""
    if arithmetic not in PR_ARITHMETIC:
        raise ValueError(f"eval.pr_arithmetic={arithmetic!r}: choose adm (ADM's float16 numbers) or exact (float64)")
    dtype, distances = (torch.float32, adm_squared_distances) if arithmetic == "adm" else (
        torch.float64, exact_squared_distances)
    real = torch.as_tensor(np.asarray(real_features), dtype=dtype, device=device)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=dtype, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"precision/recall needs features [N, D] with the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    with full_fp32():
        real_radii = manifold_radii(real, k, distances, batch_size)
        fake_radii = manifold_radii(fake, k, distances, batch_size)
        real_in = torch.zeros(len(real), dtype=torch.bool, device=device)
        fake_in = torch.zeros(len(fake), dtype=torch.bool, device=device)
        for i in range(0, len(real), batch_size):
            for j in range(0, len(fake), batch_size):
                d = distances(real[i:i + batch_size], fake[j:j + batch_size])  # ADM's order: reference rows
                real_in[i:i + batch_size] |= (d <= fake_radii[None, j:j + batch_size]).any(dim=1)
                fake_in[j:j + batch_size] |= (d <= real_radii[i:i + batch_size, None]).any(dim=0)
    return float(fake_in.double().mean()), float(real_in.double().mean())


def class_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    # share of class-conditional samples that a classifier assigns to the class they were drawn for
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.ndim != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(f"class accuracy needs logits [N, K] and labels [N], got {logits.shape} and {labels.shape}")
    return float(np.mean(logits.argmax(axis=1) == labels))


@dataclass
class ReferenceBatch:
    """An ADM reference batch: images (arr_0, uint8 [N, H, W, 3]) and/or precomputed
    pool statistics (mu, sigma) and spatial statistics (mu_s, sigma_s)."""

    images: np.ndarray | None = None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None


def has_pool_statistics(path: str | Path) -> bool:
    """Whether an ADM reference .npz stores mu and sigma (so FID needs none of its images)."""
    try:
        with np.load(Path(path).expanduser(), allow_pickle=False) as npz:
            return {"mu", "sigma"} <= set(npz.files)
    except (OSError, ValueError, zipfile.BadZipFile):
        return False  # load_reference_batch says what is wrong with it


def load_reference_batch(path: str | Path, images: bool = True) -> ReferenceBatch:
    """Read an ADM reference .npz (e.g. VIRTUAL_imagenet256_labeled.npz). `images=False`
    skips arr_0 (about 2 GB for ImageNet 256) when only the statistics are needed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"reference batch {path} not found; for ImageNet 256 download {ADM_REFERENCE_URL} "
                                f"and point the evaluator's reference path at it")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            wanted = {"mu", "sigma", "mu_s", "sigma_s"} | ({"arr_0"} if images else set())
            arrays = {key: npz[key] for key in wanted & keys}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"reference batch {path} is not a readable .npz ({err}); re-download it") from err
    for mean, cov in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mean in arrays) != (cov in arrays):
            raise ValueError(f"reference batch {path} has {mean if mean in arrays else cov} without "
                             f"{cov if mean in arrays else mean}; keys found: {sorted(keys)}")
        if mean in arrays and arrays[cov].shape != (arrays[mean].size, arrays[mean].size):
            raise ValueError(f"reference batch {path}: {cov} has shape {arrays[cov].shape}, expected "
                             f"({arrays[mean].size}, {arrays[mean].size}) to match {mean}")
    if "arr_0" in arrays and (arrays["arr_0"].ndim != 4 or arrays["arr_0"].shape[-1] != 3 or arrays["arr_0"].dtype != np.uint8):
        raise ValueError(f"reference batch {path}: arr_0 must be uint8 images [N, H, W, 3], "
                         f"got {arrays['arr_0'].dtype} {arrays['arr_0'].shape}")
    if not arrays:
        wanted_text = "arr_0, mu, sigma, mu_s, sigma_s" if images else "mu, sigma, mu_s, sigma_s (images=False)"
        raise ValueError(f"reference batch {path} has none of the ADM keys {wanted_text}; found {sorted(keys)}")
    return ReferenceBatch(images=arrays.get("arr_0"), mu=arrays.get("mu"), sigma=arrays.get("sigma"),
                          mu_s=arrays.get("mu_s"), sigma_s=arrays.get("sigma_s"))
