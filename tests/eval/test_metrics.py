"""Metric math against closed forms and hand-computed answers."""

import numpy as np
import pytest
import scipy.linalg
import torch
from adm_reference import compute_prec_recall, spatial_features

from dtr_scale.eval import metrics
from dtr_scale.eval.features import sfid_features
from dtr_scale.eval.metrics import (
    class_accuracy,
    feature_statistics,
    frechet_distance,
    inception_score,
    load_reference_batch,
    precision_recall,
)


def random_covariance(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def test_feature_statistics_are_mean_and_unbiased_covariance():
    mu, sigma = feature_statistics(np.array([[0.0, 0.0], [2.0, 2.0]]))
    np.testing.assert_allclose(mu, [1.0, 1.0])
    np.testing.assert_allclose(sigma, [[2.0, 2.0], [2.0, 2.0]])  # divides by N - 1


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    # diagonal covariances commute: FD = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert expected == pytest.approx(1 + 6.25 + 4 + 1)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_general_gaussians_matches_symmetric_form():
    # tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): sum of sqrt eigenvalues of a symmetric PSD matrix
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = random_covariance(rng, 6), random_covariance(rng, 6)
    root1 = scipy.linalg.sqrtm(s1).real
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_adds_eps_when_sqrtm_fails(monkeypatch):
    # ADM's fallback: a non-finite sqrtm is retried on (S1 + eps I)(S2 + eps I)
    calls = []
    real_sqrtm = scipy.linalg.sqrtm

    def failing_once(matrix):
        calls.append(matrix.copy())
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", failing_once)
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    with pytest.warns(RuntimeWarning, match="not finite"):
        distance = frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=0.5)
    np.testing.assert_allclose(calls[1], (s1 + 0.5 * np.eye(2)) @ (s2 + 0.5 * np.eye(2)))
    expected = 10.0 - 2 * 2 * np.sqrt(1.5 * 4.5)  # tr S1 + tr S2 - 2 tr sqrt of the offset product
    assert distance == pytest.approx(expected)


def test_frechet_distance_rejects_a_large_imaginary_part():
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="same feature layer"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_inception_score_of_identical_predictions_is_one():
    assert inception_score(np.tile([[1.0, 2.0, 3.0]], (10, 1)), split_size=10) == pytest.approx(1.0)


def test_inception_score_of_confident_distinct_predictions_is_class_count():
    assert inception_score(100.0 * np.eye(5), split_size=5) == pytest.approx(5.0)


def test_inception_score_by_hand_and_averaged_over_splits():
    # split 1: p = (0.8, 0.2), (0.2, 0.8); marginal (0.5, 0.5);
    #   KL = 0.8 ln 1.6 + 0.2 ln 0.4 for both, IS = exp(KL) = 1.212573...
    # split 2: identical predictions, IS = 1. ADM averages the per-chunk scores.
    log_p = np.log([[0.8, 0.2], [0.2, 0.8], [0.5, 0.5], [0.5, 0.5]])
    split_1 = np.exp(0.8 * np.log(1.6) + 0.2 * np.log(0.4))
    assert split_1 == pytest.approx(1.212573, abs=1e-6)
    assert inception_score(log_p, split_size=2) == pytest.approx((split_1 + 1.0) / 2)
    assert inception_score(log_p + 7.0, split_size=2) == pytest.approx((split_1 + 1.0) / 2)  # logits: shift-invariant


def adm_chunked_inception_score(logits, split_size=5000):
    # ADM evaluator's compute_inception_score on softmax(logits), written out independently
    preds = np.exp(logits - logits.max(axis=1, keepdims=True))
    preds /= preds.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


@pytest.mark.parametrize("num_samples", [1050, 12000])
def test_inception_score_is_the_mean_over_chunks_of_5000_as_adm(num_samples):
    # 1,050 samples: one chunk (10 equal splits gave 21.39 instead of 20.65 on real features);
    # 12,000: chunks of 5,000, 5,000 and 2,000
    rng = np.random.default_rng(num_samples)
    logits = rng.normal(size=(num_samples, 50)) * 3.0 + rng.normal(size=(1, 50))
    expected = adm_chunked_inception_score(logits)
    assert inception_score(logits) == pytest.approx(expected, rel=1e-10)
    assert inception_score(logits) != pytest.approx(np.mean([adm_chunked_inception_score(c, len(c))
                                                             for c in np.array_split(logits, 10)]), rel=1e-3)


def cluster(rng, center, n, dim=4):
    return center + 0.01 * rng.normal(size=(n, dim))


def test_precision_recall_of_identical_clouds_is_one():
    points = np.random.default_rng(0).normal(size=(50, 8))
    assert precision_recall(points, points.copy()) == (1.0, 1.0)


def test_precision_recall_of_far_apart_clouds_is_zero():
    rng = np.random.default_rng(0)
    assert precision_recall(rng.normal(size=(40, 8)), 100.0 + rng.normal(size=(30, 8))) == (0.0, 0.0)


def test_precision_recall_of_partly_overlapping_clusters():
    # real = clusters A (10) + B (30), fake = A (10, same points) + C (10, far away):
    # half of the fakes lie on the real manifold, a quarter of the reals on the fake one
    rng = np.random.default_rng(0)
    a, b, c = cluster(rng, 0.0, 10), cluster(rng, 50.0, 30), cluster(rng, -50.0, 10)
    precision, recall = precision_recall(np.concatenate([a, b]), np.concatenate([a, c]))
    assert (precision, recall) == (0.5, 0.25)


@pytest.mark.parametrize("k,recall", [(3, 13 / 20), (2, 12 / 20), (4, 14 / 20)])
def test_precision_recall_radius_is_kth_nearest_other_point(k, recall):
    # reals at x = 0..19; fakes at x = 0.5..9.5 plus 10 far away. A near fake's radius is the
    # distance to its k-th nearest other fake (k at the end x = 9.5), so the reals
    # x = 0..9 + k (< 9.5 + k) are covered; no fake radius reaches x >= 10 + k.
    line = lambda x: np.stack([x, np.zeros_like(x)], axis=1)
    real = line(np.arange(20.0))
    fake = line(np.concatenate([np.arange(10.0) + 0.5, 1000.0 + np.arange(10.0)]))
    assert precision_recall(real, fake, k=k) == pytest.approx((0.5, recall))
    assert precision_recall(real, fake, k=k, batch_size=3) == pytest.approx((0.5, recall))


def quantised_inception_like(rng, n, mean, dim=64):
    # post-ReLU features on a 1/16 grid: every float32 sum and product of their float16 values is
    # exact, so any summation order (numpy's, torch's, cuBLAS's) gives the same float16 distances
    return np.round(np.maximum(rng.normal(mean, 1.0, size=(n, dim)), 0) * 16) / 16


@pytest.mark.parametrize("batch_size", [10_000, 64])
def test_precision_recall_equal_adms_manifold_estimator(batch_size):
    rng = np.random.default_rng(0)
    real, fake = quantised_inception_like(rng, 300, 0.5), quantised_inception_like(rng, 200, 0.7)
    adm = compute_prec_recall(real, fake, batch=batch_size)
    assert precision_recall(real, fake, batch_size=batch_size) == adm == (0.405, 266 / 300)
    # float16 rounding turns near misses into ties, and ties count as inside: recall runs higher
    assert precision_recall(real, fake, arithmetic="exact") == (0.405, 265 / 300)


def test_precision_recall_ties_and_exact_duplicates_by_hand():
    # four exact duplicates of x = 100: each one's radius is 0 in any arithmetic (itself and
    # three copies at distance 0). ADM's float16: 100^2 = 10000; against 102, 100 * 102 = 10200
    # and 2 * 10200 = 20400 are exact, 102^2 = 10404 rounds to 10400 (spacing 8, ties to even),
    # so 10000 - 20400 + 10400 = 0 <= 0: inside. Against 110: 12100 -> 12096, distance 96: outside.
    real = np.full((4, 1), 100.0)
    fake = np.array([[100.0], [102.0], [110.0], [120.0]])
    assert compute_prec_recall(real, fake) == (0.5, 1.0)
    assert precision_recall(real, fake) == (0.5, 1.0)
    assert precision_recall(real, fake, arithmetic="exact") == (0.25, 1.0)  # only the duplicate is inside


def test_a_block_with_a_non_finite_float16_distance_is_redone_in_float32_as_adm():
    rng = np.random.default_rng(1)
    real, fake = quantised_inception_like(rng, 40, 0.5, dim=16), quantised_inception_like(rng, 30, 0.6, dim=16)
    fake[25] = 70.0  # |v|^2 = 78,400 overflows float16 (max 65,504): its blocks fall back to float32
    for batch_size in (16, 10_000):
        adm = compute_prec_recall(real, fake, batch=batch_size)
        assert precision_recall(real, fake, batch_size=batch_size) == adm
    assert metrics.adm_squared_distances(torch.tensor(fake[25:26]), torch.tensor(fake[25:26])).item() == 0.0


def test_precision_recall_run_without_tf32_and_restore_it(monkeypatch):
    seen = []
    adm_distances = metrics.adm_squared_distances
    monkeypatch.setattr(metrics, "adm_squared_distances", lambda u, v: (
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision())), adm_distances(u, v))[1])
    saved = torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("high")
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        points = np.random.default_rng(2).normal(size=(20, 4))
        assert precision_recall(points, points + 0.01) == (1.0, 1.0)
        assert seen and set(seen) == {(False, "highest")}
        assert (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32) == ("high", True)
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cuda.matmul.allow_tf32 = saved[1]


def test_precision_recall_names_the_arithmetics():
    with pytest.raises(ValueError, match="eval.pr_arithmetic='fp16'.*adm.*exact"):
        precision_recall(np.zeros((5, 2)), np.zeros((5, 2)), arithmetic="fp16")


def test_sfid_features_are_adms_layout():
    # ADM: TF's NHWC mixed_6/conv, channels :7, each image flattened (h, w, c) with c fastest
    mixed_6_conv = torch.randn(3, 192, 17, 17, generator=torch.Generator().manual_seed(0))
    ours = sfid_features(mixed_6_conv).numpy()
    assert ours.shape == (3, 17 * 17 * 7)
    np.testing.assert_array_equal(ours, spatial_features(mixed_6_conv.permute(0, 2, 3, 1).numpy()))
    assert ours[1, 7 * (17 * 2 + 5) + 4] == mixed_6_conv[1, 4, 2, 5]  # row 2, column 5, channel 4


def test_precision_recall_needs_more_points_than_k():
    with pytest.raises(ValueError, match="more than 3 points"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


def test_class_accuracy():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert class_accuracy(logits, np.array([0, 1, 1, 0])) == 0.5


def write_reference(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_load_reference_batch_reads_adm_keys(tmp_path):
    images = np.zeros((2, 8, 8, 3), np.uint8)
    path = write_reference(tmp_path / "ref.npz", arr_0=images, mu=np.zeros(3), sigma=np.eye(3),
                           mu_s=np.ones(2), sigma_s=np.eye(2))
    ref = load_reference_batch(path)
    np.testing.assert_array_equal(ref.images, images)
    np.testing.assert_array_equal(ref.sigma, np.eye(3))
    np.testing.assert_array_equal(ref.mu_s, np.ones(2))
    assert load_reference_batch(path, images=False).images is None


def test_load_reference_batch_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled.npz"):
        load_reference_batch(tmp_path / "VIRTUAL_imagenet256_labeled.npz")


@pytest.mark.parametrize("arrays,message", [
    ({"mu": np.zeros(3)}, "without sigma"),
    ({"mu": np.zeros(3), "sigma": np.eye(2)}, "expected"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "uint8"),
    ({"images": np.zeros(2)}, "none of the ADM keys"),
])
def test_load_reference_batch_rejects_malformed_files(tmp_path, arrays, message):
    path = write_reference(tmp_path / "ref.npz", **arrays)
    with pytest.raises(ValueError, match=message) as info:
        load_reference_batch(path)
    assert str(path) in str(info.value)


def test_load_reference_batch_rejects_a_non_npz_file(tmp_path):
    path = tmp_path / "ref.npz"
    path.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_reference_batch(path)
