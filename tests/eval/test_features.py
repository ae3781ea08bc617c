"""Feature networks end to end: a random-weight FID Inception loaded from a file, and the digits classifier."""

from unittest import mock

import numpy as np
import pytest
import torch

from dtr_scale.data.digits import load_digits_images
from dtr_scale.eval import features
from dtr_scale.eval.features import (
    INCEPTION_FILENAME,
    INCEPTION_URL,
    DigitsClassifier,
    InceptionFeatures,
    digits_split,
    load_digits_classifier,
    train_digits_classifier,
)
from dtr_scale.eval.metrics import class_accuracy, feature_statistics, frechet_distance, inception_score, precision_recall


def random_inception_weights(path):
    """torch-fidelity's Inception with random (He-normal) weights, saved as a weights file;
    nothing is downloaded. He init keeps the activations O(1) through the 90-odd layers."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    with torch.random.fork_rng(devices=[]), \
            mock.patch.object(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {}), \
            mock.patch.object(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None):
        torch.manual_seed(0)
        net = fidelity.FeatureExtractorInceptionV3("random", ["2048"])
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return InceptionFeatures(random_inception_weights(tmp_path_factory.mktemp("inception") / INCEPTION_FILENAME))


@pytest.fixture(scope="module")
def small_images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(5, 24, 24, 3), dtype=np.uint8)


def test_missing_inception_weights_say_what_to_download_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("DTR_SCALE_CACHE", str(tmp_path))
    monkeypatch.delenv("DTR_SCALE_INCEPTION", raising=False)
    with pytest.raises(FileNotFoundError) as info:
        InceptionFeatures()
    message = str(info.value)
    assert INCEPTION_FILENAME in message and INCEPTION_URL in message
    assert str(tmp_path / INCEPTION_FILENAME) in message and "DTR_SCALE_INCEPTION" in message


def test_inception_weights_path_from_environment(tmp_path, monkeypatch):
    weights = tmp_path / "elsewhere.pth"
    weights.write_bytes(b"")
    monkeypatch.setenv("DTR_SCALE_INCEPTION", str(weights))
    assert features.inception_weights_path() == weights


def test_unreadable_inception_weights_name_the_file(tmp_path):
    path = tmp_path / INCEPTION_FILENAME
    path.write_bytes(b"truncated download")
    with pytest.raises(RuntimeError, match=INCEPTION_FILENAME):
        InceptionFeatures(path)


def test_inception_features_end_to_end(inception, small_images):
    out = inception.extract(small_images, batch_size=2)
    assert out["pool"].shape == (5, 2048) and out["logits"].shape == (5, 1008) and out["spatial"].shape == (5, 17 * 17 * 7)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in out.values())
    assert out["pool"].std(axis=0).mean() > 1e-4  # random weights still tell images apart

    # pool and logits are torch-fidelity's pool3 and unbiased logits, whatever the batching
    x = torch.from_numpy(small_images).permute(0, 3, 1, 2)
    pool, logits = inception.net(x)
    np.testing.assert_allclose(out["pool"], pool.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["logits"], logits.numpy(), rtol=1e-4, atol=1e-5)

    # spatial = mixed_6/conv (Mixed_6d's 1x1 branch applied to Mixed_6c's output), channels :7, NHWC order
    mixed_6c = []
    handle = inception.net.Mixed_6c.register_forward_hook(lambda module, args, output: mixed_6c.append(output))
    with torch.no_grad():
        inception.net(x)
        mixed_6_conv = inception.net.Mixed_6d.branch1x1(mixed_6c[0])
    handle.remove()
    expected = mixed_6_conv[:, :7].permute(0, 2, 3, 1).reshape(5, -1)
    np.testing.assert_allclose(out["spatial"], expected.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["spatial"][:, :7], mixed_6_conv[:, :7, 0, 0].numpy(), rtol=1e-4, atol=1e-5)

    # the metrics take these features as they come
    varied = np.argsort(out["pool"].var(axis=0))[-4:]  # 5 images give a full-rank covariance in 4 dims
    mu, sigma = feature_statistics(out["pool"][:, varied])
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    assert 1.0 <= inception_score(out["logits"], splits=1) < 1008
    assert precision_recall(out["pool"], out["pool"]) == (1.0, 1.0)


def test_extract_rejects_non_uint8_images(inception):
    with pytest.raises(ValueError, match="uint8"):
        inception.extract(np.zeros((2, 8, 8, 3), np.float32))


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
    monkeypatch.setattr(features, "train_digits_classifier", mock.Mock(side_effect=AssertionError("retrained")))
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
