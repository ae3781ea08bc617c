"""The digits classifier: the embedded digits' feature network, trained, cached and scored against."""

from unittest import mock

import numpy as np
import pytest
import torch

from dtr_scale.data.digits import load_digits_images
from dtr_scale.eval import digits as digits_module
from dtr_scale.eval.digits import DigitsClassifier, digits_split, load_digits_classifier, train_digits_classifier
from dtr_scale.eval.metrics import class_accuracy, feature_statistics, frechet_distance


@pytest.fixture(scope="module")
def digits():
    return load_digits_images(size=16)


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache") / "digits_classifier.pt"


@pytest.fixture(scope="module")
def digits_net(digits_cache):
    return load_digits_classifier(digits_cache)  # trains (a few seconds) and writes the cache


def test_digits_classifier_held_out_accuracy_above_90_percent(digits_net, digits):
    images, labels = digits
    _, test_idx = digits_split(len(images))
    out = digits_net.extract(images[test_idx], batch_size=100)
    assert out["pool"].shape == (len(test_idx), 64) and out["logits"].shape == (len(test_idx), 10)
    accuracy = class_accuracy(out["logits"], labels[test_idx])
    assert accuracy > 0.9
    assert accuracy == pytest.approx(digits_net.test_accuracy)


def test_digits_fd_of_real_halves_is_far_below_real_vs_noise(digits_net, digits):
    images, _ = digits
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    half_a, half_b = (digits_net.extract(images[idx])["pool"] for idx in np.array_split(order, 2))
    noise = digits_net.extract(rng.integers(0, 256, size=(900, 16, 16, 3), dtype=np.uint8))["pool"]
    stats_a = feature_statistics(half_a)
    real_vs_real = frechet_distance(*stats_a, *feature_statistics(half_b))
    real_vs_noise = frechet_distance(*stats_a, *feature_statistics(noise))
    assert real_vs_real < 0.01 * real_vs_noise


def test_digits_classifier_is_cached_and_reused(digits_net, digits_cache, monkeypatch):
    assert digits_cache.is_file()
    monkeypatch.setattr(digits_module, "train_digits_classifier", mock.Mock(side_effect=AssertionError("retrained")))
    again = load_digits_classifier(digits_cache)
    for a, b in zip(digits_net.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert again.test_accuracy == digits_net.test_accuracy


def test_digits_classifier_training_is_deterministic():
    first, accuracy_1 = train_digits_classifier(epochs=1)
    second, accuracy_2 = train_digits_classifier(epochs=1)
    assert accuracy_1 == accuracy_2
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_digits_classifier_rejects_other_image_sizes():
    with pytest.raises(ValueError, match="16, 16"):
        DigitsClassifier(16).extract(np.zeros((2, 32, 32, 3), np.uint8))


def test_the_floor_is_the_mean_fd_of_random_halves_and_scores_report_it(digits_net, digits):
    images, labels = digits
    features = digits_net.extract(images)["pool"]
    rng = np.random.default_rng(7)
    expected = []
    for _ in range(3):
        half_a, half_b = np.array_split(rng.permutation(len(features)), 2)
        expected.append(frechet_distance(*feature_statistics(features[half_a]), *feature_statistics(features[half_b])))
    assert digits_module.half_split_fd(features, splits=3, seed=7) == pytest.approx(np.mean(expected), rel=1e-12)
    half = rng.permutation(len(images))[: len(images) // 2]
    with mock.patch.object(digits_module, "load_digits_classifier", return_value=digits_net):
        scores = digits_module.digits_scores(images[half], labels[half])
    assert scores["digits_fd_floor"] == pytest.approx(digits_module.half_split_fd(features), rel=1e-12)
    # A random half of the real digits against all of them, which contain it: the means and the
    # covariances lie halfway to the other half's, so about a quarter of the floor, and below it.
    assert 0 < scores["digits_fd"] < scores["digits_fd_floor"] and scores["class_accuracy"] > 0.95
