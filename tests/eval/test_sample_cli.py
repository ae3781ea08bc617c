"""`dtr-scale sample` as a user types it: a tiny DiT saved as DiT's released .pt files are, sampled
for chosen classes through the console entry, equals the library's samples for the same seeds."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtr_scale.eval.generate import indexed_noise
from dtr_scale.eval.sample_cli import compose_config, sample_labels
from dtr_scale.models.weights import load_dit_weights
from dtr_scale.train.components import build_diffusion, build_model

DTR_SCALE = str(Path(sys.executable).with_name("dtr-scale"))


@pytest.fixture(scope="module")
def official_pt(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "DiT-tiny.pt"
    torch.manual_seed(5)
    torch.save(build_model(compose_config(["model=tiny", "routing=none"], str(path.parent)), load_init=False).state_dict(),
               path)
    return path


def expected_images(weights, labels, steps, cfg_scale, seed):
    """The same samples drawn here: tiny DiT + the file's weights, DDIM, the pixel autoencoder."""
    from dtr_scale.models.autoencoders import PixelAutoencoder
    from dtr_scale.diffusion.sampling import sample_latents

    cfg = compose_config(["model=tiny", "routing=none"], "unused")
    model = load_dit_weights(build_model(cfg, load_init=False), weights).eval()
    with torch.no_grad():
        latents = sample_latents(model, build_diffusion(cfg).respaced(steps, "ddim"), torch.tensor(labels), shape=(4, 8, 8),
                                 cfg_scale=cfg_scale, guided_channels=cfg.diffusion.guided_channels, sampler="ddim",
                                 eta=cfg.diffusion.ddim_eta, noise=indexed_noise(seed, np.arange(len(labels))))
    return PixelAutoencoder().decode(latents).numpy()


def test_sample_command_writes_the_grid_and_adm_npz_for_chosen_classes(tmp_path, official_pt):
    out = tmp_path / "samples"
    done = subprocess.run([DTR_SCALE, "sample", f"weights={official_pt}", "model=tiny", "routing=none",
                           "classes=[3,7]", "num_samples=4", "cfg_scale=2.0", "sampler=ddim", "steps=4", "seed=11",
                           "autoencoder=pixel", f"out={out}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with np.load(out / "samples.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert labels.tolist() == [3, 7, 3, 7] and images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, expected_images(official_pt, [3, 7, 3, 7], steps=4, cfg_scale=2.0, seed=11))
    grid = Image.open(out / "grid.png")
    assert grid.width >= 4 * 16 * 4  # four columns, each image enlarged at least 4x


def test_sample_command_without_weights_says_what_to_pass(tmp_path):
    done = subprocess.run([DTR_SCALE, "sample", "model=tiny"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "weights=" in done.stderr


def test_balanced_and_random_labels():
    assert sample_labels("balanced", 5, 3, seed=0).tolist() == [0, 1, 2, 0, 1]
    drawn = sample_labels("random", 200, 10, seed=1)
    assert set(drawn.tolist()) == set(range(10)) and np.array_equal(drawn, sample_labels("random", 200, 10, seed=1))


def test_sample_is_listed_and_has_help():
    listed = subprocess.run([DTR_SCALE], capture_output=True, text=True, timeout=120)
    assert "dtr-scale sample weights=PATH" in listed.stdout
    done = subprocess.run([DTR_SCALE, "sample", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "classes" in done.stdout and "autoencoder" in done.stdout
