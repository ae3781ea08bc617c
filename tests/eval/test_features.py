"""The FID Inception end to end: random weights loaded from a file, features as ADM takes them."""

from unittest import mock

import numpy as np
import pytest
import torch

from dtr_scale.eval import features
from dtr_scale.eval.features import INCEPTION_FILENAME, INCEPTION_URL, InceptionFeatures
from dtr_scale.models.weights import UnsafeWeightsError, WeightsFileError
from dtr_scale.eval.metrics import feature_statistics, frechet_distance, inception_score, precision_recall


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
    with pytest.raises(WeightsFileError, match=INCEPTION_FILENAME):
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
    assert 1.0 <= inception_score(out["logits"]) < 1008
    assert precision_recall(out["pool"], out["pool"]) == (1.0, 1.0)


def test_extract_rejects_non_uint8_images(inception):
    with pytest.raises(ValueError, match="uint8"):
        inception.extract(np.zeros((2, 8, 8, 3), np.float32))


@pytest.fixture
def tf32_restored():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


def test_inception_features_are_fp32_when_the_backend_enabled_tf32(inception, small_images, tf32_restored):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    plain = inception.extract(small_images, batch_size=5)

    torch.set_float32_matmul_precision("high")  # what backend=gpu_fast sets for training
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    seen = []
    record = inception.net.register_forward_pre_hook(lambda module, args: seen.append(
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())))
    try:
        with_tf32 = inception.extract(small_images, batch_size=5)
    finally:
        record.remove()

    assert seen == [(False, False, "highest")]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision()) == (True, True, "high")  # the caller's settings are back
    for name in plain:
        np.testing.assert_array_equal(with_tf32[name], plain[name])


class CreatesMarker:
    """A pickle payload: unpickling it with an unrestricted unpickler creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_an_inception_file_carrying_a_payload_is_refused_and_never_run(tmp_path):
    evil, marker = tmp_path / "evil.pth", tmp_path / "payload_ran"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "payload": CreatesMarker(marker)}, evil)
    with pytest.raises(UnsafeWeightsError) as info:
        InceptionFeatures(evil)
    assert not marker.exists()
    message = str(info.value)
    assert str(evil) in message and "weights_only=True" in message and "save_file" in message
    assert "if you trust" in message.lower()


def test_inception_weights_load_from_safetensors(tmp_path, inception, small_images):
    from safetensors.torch import save_file

    path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in inception.net.state_dict().items()}, str(path))
    np.testing.assert_array_equal(InceptionFeatures(path).extract(small_images)["pool"],
                                  inception.extract(small_images)["pool"])


class ImageSet(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return torch.from_numpy(self.images[i]).permute(2, 0, 1).contiguous()


def test_fid_and_inception_score_equal_torch_fidelity_on_the_same_weights_and_images(tmp_path):
    # Both sides load one weights file in torch-fidelity's format; 6 vs 6 images of 32 px
    # (the extractor resizes to 299). One IS chunk of <= 5,000 samples is torch-fidelity's isc_splits=1.
    import torch_fidelity

    weights = random_inception_weights(tmp_path / INCEPTION_FILENAME)
    rng = np.random.default_rng(1)
    fake = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    real = np.clip(fake.astype(int) // 2 + rng.integers(0, 128, size=fake.shape), 0, 255).astype(np.uint8)

    net = InceptionFeatures(weights)
    fake_features, real_features = net.extract(fake, batch_size=6), net.extract(real, batch_size=6)
    fid = frechet_distance(*feature_statistics(fake_features["pool"]), *feature_statistics(real_features["pool"]))
    theirs = torch_fidelity.calculate_metrics(
        input1=ImageSet(fake), input2=ImageSet(real), fid=True, isc=True, isc_splits=1, samples_shuffle=False,
        feature_extractor_weights_path=str(weights), cache=False, verbose=False, cuda=False, batch_size=6,
        save_cpu_ram=True)  # no DataLoader worker processes
    assert fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert inception_score(fake_features["logits"]) == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
