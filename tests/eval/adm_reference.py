"""ADM's precision/recall and sFID layout, ported to numpy for the tests to compare against.

A line-by-line port of guided-diffusion `evaluations/evaluator.py` (ManifoldEstimator with
nhood_sizes=(3,), DistanceBlock, `_batch_pairwise_distances`, `compute_prec_recall`, and the
spatial features of `_create_feature_graph`), with its TensorFlow graph written as numpy
float16 arithmetic: numpy rounds each float16 operation to float16, as TF's float16 kernels do.
The two reductions TF runs on the GPU with a float32 accumulator (cuBLAS's float16 matmul,
reduce_sum of float16) accumulate in float32 here and round once. Deliberately independent of
dtr_scale: no torch, no shared helper.
"""

from __future__ import annotations

import numpy as np


def batch_pairwise_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """`_batch_pairwise_distances`: max(|u|^2 - 2 u v^T + |v|^2, 0) in the inputs' dtype."""
    with np.errstate(over="ignore", invalid="ignore"):
        norm_u = np.sum(np.square(u), axis=1, dtype=np.float32).astype(u.dtype).reshape(-1, 1)
        norm_v = np.sum(np.square(v), axis=1, dtype=np.float32).astype(v.dtype).reshape(1, -1)
        product = (u.astype(np.float32) @ v.astype(np.float32).T).astype(u.dtype)
        return np.maximum(norm_u - 2 * product + norm_v, u.dtype.type(0))


def distance_block(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """DistanceBlock.distance_block: float16 distances, or float32 ones when any is not finite."""
    d16 = batch_pairwise_distances(u.astype(np.float16), v.astype(np.float16))
    if np.all(np.isfinite(d16)):
        return d16.astype(np.float32)
    return batch_pairwise_distances(u.astype(np.float32), v.astype(np.float32))


def manifold_radii(features: np.ndarray, k: int = 3, row_batch: int = 10000, col_batch: int = 10000) -> np.ndarray:
    """ManifoldEstimator.manifold_radii with nhood_sizes=(k,): radii [N, 1]."""
    n = len(features)
    radii = np.zeros([n, 1], dtype=np.float32)
    distances = np.zeros([row_batch, n], dtype=np.float32)
    for begin1 in range(0, n, row_batch):
        end1 = min(begin1 + row_batch, n)
        for begin2 in range(0, n, col_batch):
            end2 = min(begin2 + col_batch, n)
            distances[0:end1 - begin1, begin2:end2] = distance_block(features[begin1:end1], features[begin2:end2])
        radii[begin1:end1, :] = np.partition(distances[0:end1 - begin1, :], np.arange(k + 1), axis=1)[:, [k]]
    return radii


def less_thans(batch_1, radii_1, batch_2, radii_2):
    """DistanceBlock.less_thans: which rows of batch_1 fall in batch_2's balls and vice versa."""
    dist32 = distance_block(batch_1, batch_2).astype(np.float32)[..., None]
    return np.any(dist32 <= radii_2, axis=1), np.any(dist32 <= radii_1[:, None], axis=0)


def evaluate_pr(features_1, radii_1, features_2, radii_2, row_batch: int = 10000, col_batch: int = 10000):
    """ManifoldEstimator.evaluate_pr: (precision, recall) arrays of length 1."""
    status_1 = np.zeros([len(features_1), radii_2.shape[1]], dtype=bool)
    status_2 = np.zeros([len(features_2), radii_1.shape[1]], dtype=bool)
    for begin_1 in range(0, len(features_1), row_batch):
        end_1 = begin_1 + row_batch
        for begin_2 in range(0, len(features_2), col_batch):
            end_2 = begin_2 + col_batch
            in_1, in_2 = less_thans(features_1[begin_1:end_1], radii_1[begin_1:end_1],
                                    features_2[begin_2:end_2], radii_2[begin_2:end_2])
            status_1[begin_1:end_1] |= in_1
            status_2[begin_2:end_2] |= in_2
    return np.mean(status_2.astype(np.float64), axis=0), np.mean(status_1.astype(np.float64), axis=0)


def compute_prec_recall(ref: np.ndarray, sample: np.ndarray, batch: int = 10000) -> tuple[float, float]:
    """Evaluator.compute_prec_recall(activations_ref, activations_sample)."""
    ref, sample = np.asarray(ref, np.float32), np.asarray(sample, np.float32)
    radii_1 = manifold_radii(ref, 3, batch, batch)
    radii_2 = manifold_radii(sample, 3, batch, batch)
    precision, recall = evaluate_pr(ref, radii_1, sample, radii_2, batch, batch)
    return float(precision[0]), float(recall[0])


def spatial_features(mixed_6_conv_nhwc: np.ndarray) -> np.ndarray:
    """`_create_feature_graph`'s spatial[..., :7] of TF's NHWC mixed_6/conv, then
    compute_activations' reshape([N, -1])."""
    spatial = mixed_6_conv_nhwc[..., :7]
    return spatial.reshape([spatial.shape[0], -1])
