"""`dtr-scale sample` as a user types it: a tiny DiT saved as DiT's released .pt files are, sampled
for chosen classes through the console entry, equals the library's samples for the same seeds."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtr_scale.config import ConfigError
from dtr_scale.eval.generate import class_labels, generate_chunks, indexed_noise
from dtr_scale.eval.released import model_from_weights
from dtr_scale.eval.sample_cli import compose_config, labels_of, main, sample_spec, split_arguments
from dtr_scale.eval.settings import SampleSpec
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
    done = subprocess.run([DTR_SCALE, "sample", "--weights", str(official_pt), "--autoencoder", "pixel", "model=tiny",
                           "routing=none", "classes=[3,7]", "num_samples=4", "diffusion.cfg_scale=2.0",
                           "diffusion.sampler=ddim", "diffusion.sampling_steps=4", "seed=11", f"out={out}"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with np.load(out / "samples.npz") as npz:
        images, labels = npz["arr_0"], npz["arr_1"]
    assert labels.tolist() == [3, 7, 3, 7] and images.shape == (4, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, expected_images(official_pt, [3, 7, 3, 7], steps=4, cfg_scale=2.0, seed=11))
    grid = Image.open(out / "grid.png")
    assert grid.width >= 4 * 16 * 4  # four columns, each image enlarged at least 4x


def test_sample_command_without_weights_says_what_to_pass(tmp_path):
    done = subprocess.run([DTR_SCALE, "sample", "model=tiny"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--weights" in done.stderr


@pytest.mark.parametrize("old, new", [("weights=w.pt", "--weights PATH"), ("steps=250", "diffusion.sampling_steps=N"),
                                      ("sampler=ddim", "diffusion.sampler="), ("cfg_scale=4", "diffusion.cfg_scale=S"),
                                      ("autoencoder=pixel", "--autoencoder NAME")])
def test_the_old_spellings_are_refused_naming_the_one_spelling(old, new, tmp_path):
    # steps= is training steps everywhere else: silently taking it as sampling steps here misled users
    done = subprocess.run([DTR_SCALE, "sample", "--weights", "w.pt", old, f"out={tmp_path}"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and new in done.stderr and old in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_classes_setting_names_the_evaluators_labels():
    assert labels_of("balanced", 10) == ("balanced", ()) and labels_of("random", 10) == ("random", ())
    assert labels_of([3, 7], 10) == ("classes", (3, 7)) and labels_of(4, 10) == ("classes", (4,))
    with pytest.raises(ConfigError, match=r"classes=\[3, 10\]: give class indices in \[0, 10\)"):
        labels_of([3, 10], 10)
    spec = SampleSpec(weights="w", num_samples=5, chunk_size=2, num_classes=10, latent_shape=(4, 8, 8),
                      labels="classes", classes=(3, 7))
    assert class_labels(spec, np.arange(5)).tolist() == [3, 7, 3, 7, 3]
    assert "classes" not in SampleSpec(**{**spec.__dict__, "labels": "balanced", "classes": ()}).to_json()


def test_sampling_on_two_processes_gives_the_one_process_images_and_dits_layout(tmp_path, official_pt):
    # the evaluator's path: per-index seeds, so the split over processes changes nothing
    common = [f"--weights={official_pt}", "--autoencoder", "pixel", "model=tiny", "routing=none", "classes=random",
              "num_samples=10", "batch_size=3", "diffusion.sampler=ddim", "diffusion.sampling_steps=3", "seed=2"]
    one, two = tmp_path / "one", tmp_path / "two"
    for out, world_size in ((one, 1), (two, 2)):
        done = subprocess.run([DTR_SCALE, "sample", *common, f"world_size={world_size}", f"out={out}"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    with np.load(one / "samples.npz") as a, np.load(two / "samples.npz") as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
        images, labels = b["arr_0"], b["arr_1"]
    spec = SampleSpec(weights=str(official_pt), num_samples=10, chunk_size=3, num_classes=10, latent_shape=(4, 8, 8),
                      labels="random", seed=2)
    assert labels.tolist() == class_labels(spec, np.arange(10)).tolist()  # the evaluator's random labels
    np.testing.assert_array_equal(images, expected_images(official_pt, labels.tolist(), steps=3, cfg_scale=1.5, seed=2))
    # DiT's sample_ddp.py: FOLDER/000000.png ... and FOLDER.npz, as its create_npz_from_sample_folder reads them
    pngs = sorted(p.name for p in (two / "samples").iterdir())
    assert pngs == [f"{i:06d}.png" for i in range(10)]
    from_folder = np.stack([np.asarray(Image.open(two / "samples" / name)).astype(np.uint8) for name in pngs])
    np.testing.assert_array_equal(from_folder, images)
    assert not list(two.glob("chunk-*.npz"))  # merged


def test_an_interrupted_sampling_resumes_from_its_chunks(tmp_path, official_pt):
    args = ["--weights", str(official_pt), "--autoencoder", "pixel", "model=tiny", "routing=none", "classes=balanced",
            "num_samples=6", "batch_size=3", "diffusion.sampler=ddim", "diffusion.sampling_steps=2", f"out={tmp_path}"]
    options, overrides = split_arguments(args)
    cfg = compose_config(overrides, str(tmp_path))
    model, model_cfg = model_from_weights(official_pt, cfg)
    spec = sample_spec(options, model_cfg, cfg)
    generate_chunks(model, build_diffusion(model_cfg).respaced(2, "ddim"), spec, tmp_path,
                    lambda latents: torch.zeros(len(latents), 16, 16, 3, dtype=torch.uint8), max_chunks=1)
    main(args)  # chunk 0 (all black here, so it shows) is kept; chunk 1 is sampled now
    with np.load(tmp_path / "samples.npz") as npz:
        assert not npz["arr_0"][:3].any() and npz["arr_0"][3:].any()


def test_sample_is_listed_and_has_help():
    listed = subprocess.run([DTR_SCALE], capture_output=True, text=True, timeout=120)
    assert "dtr-scale sample --weights PATH" in listed.stdout
    done = subprocess.run([DTR_SCALE, "sample", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "classes" in done.stdout and "autoencoder" in done.stdout


def test_sampling_on_gpus_where_there_are_none_says_so(tmp_path, official_pt, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, GPUs or not
    with pytest.raises(SystemExit) as exit_:
        main(["--weights", str(official_pt), "model=tiny", "routing=none", "device=cuda", "world_size=2", f"out={tmp_path}"])
    assert exit_.value.code == 2 and "device=cuda, but no GPU is visible here" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written
