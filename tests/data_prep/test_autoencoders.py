import numpy as np
import pytest
import torch

from dtr_scale.models.autoencoders import MissingWeightsError, PixelAutoencoder, load_autoencoder


def test_pixel_autoencoder_is_grayscale_space_to_depth():
    images = torch.zeros(1, 4, 4, 3, dtype=torch.uint8)
    images[0, 0, 1] = 255  # white pixel at (y=0, x=1)
    images[0, 1, 0] = torch.tensor([0, 255, 255], dtype=torch.uint8)  # channel mean 170 at (y=1, x=0)
    mean, std = PixelAutoencoder().encode(images)
    assert mean.shape == (1, 4, 2, 2) and (std == 0).all()
    # pixel_unshuffle: channel k of block (0, 0) holds pixel (k // 2, k % 2)
    np.testing.assert_allclose(mean[0, :, 0, 0], [-1, 1, 170 / 127.5 - 1, -1], atol=1e-6)
    assert (mean[0, :, :, 1] == -1).all() and (mean[0, :, 1, :] == -1).all()


def test_pixel_decode_inverts_encode_on_gray_images():
    gray = torch.randint(0, 256, (3, 8, 8, 1), dtype=torch.uint8).repeat(1, 1, 1, 3)
    autoencoder = PixelAutoencoder()
    mean, _ = autoencoder.encode(gray)
    assert torch.equal(autoencoder.decode(mean * autoencoder.scale_factor), gray)
    assert autoencoder.latent_shape(16) == (4, 8, 8)
    with pytest.raises(ValueError, match="even"):
        autoencoder.latent_shape(15)


def test_sd_vae_wrapper_returns_the_posterior_and_decodes_scaled_latents(tiny_vae_dir):
    from diffusers import AutoencoderKL

    autoencoder = load_autoencoder(tiny_vae_dir)
    reference = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    assert autoencoder.scale_factor == pytest.approx(0.18215) and autoencoder.latent_shape(16) == (4, 8, 8)
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    mean, std = autoencoder.encode(images)
    with torch.no_grad():
        posterior = reference.encode(images.permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist
        pixels = reference.decode(posterior.mean).sample
    torch.testing.assert_close(mean, posterior.mean)
    torch.testing.assert_close(std, posterior.std)
    assert (std > 0).all()
    decoded = autoencoder.decode(mean * autoencoder.scale_factor)
    expected = ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert decoded.dtype == torch.uint8 and decoded.shape == (2, 16, 16, 3)
    assert (decoded.int() - expected.int()).abs().max() <= 1


def test_missing_sd_vae_weights_say_what_to_download_and_where(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        load_autoencoder("sd-vae-ft-mse", weights=str(tmp_path / "vae"))
    message = str(err.value)
    for needed in ("config.json", "diffusion_pytorch_model.safetensors", "huggingface.co/stabilityai/sd-vae-ft-mse",
                   "--vae-weights", str(tmp_path / "vae")):
        assert needed in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingWeightsError, match="config.json"):
        load_autoencoder("sd-vae-ft-ema", weights=str(tmp_path / "empty"))


def test_unknown_autoencoder_names_are_refused():
    with pytest.raises(ValueError, match="pixel, sd-vae-ft-ema, sd-vae-ft-mse"):
        load_autoencoder("vqgan")
