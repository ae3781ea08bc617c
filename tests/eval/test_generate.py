"""Sampling to files: preempted, resumed and re-split jobs draw the same images bit for bit."""

import numpy as np
import pytest
from PIL import Image

from dtr_scale.models.autoencoders import PixelAutoencoder
from dtr_scale.eval.generate import (
    GRID_PNG,
    SAMPLES_NPZ,
    SampleFolderError,
    chunk_path,
    class_labels,
    generate_chunks,
    generate_samples,
    load_samples,
    merge_samples,
    open_sample_folder,
)
from dtr_scale.eval.sample import load_model
from dtr_scale.eval.settings import SampleSpec
from dtr_scale.train.components import build_diffusion

DECODE = PixelAutoencoder().decode


@pytest.fixture(scope="module")
def model_and_diffusion(trained_run):
    model, cfg = load_model(trained_run / "checkpoints" / "step_00000250", use_ema=False)
    return model, build_diffusion(cfg).respaced(5)


def spec(**changes) -> SampleSpec:
    base = dict(weights="step_00000250/raw", num_samples=25, chunk_size=5, num_classes=10, latent_shape=(4, 8, 8),
                sampling_steps=5, cfg_scale=1.5, seed=3)
    return SampleSpec(**{**base, **changes})


def test_preempted_and_resplit_sampling_equal_an_uninterrupted_run(model_and_diffusion, tmp_path):
    model, diffusion = model_and_diffusion
    straight = load_samples(generate_samples(model, diffusion, spec(), tmp_path / "straight", DECODE))

    # preempted after 2 of 5 chunks; the killed writer of the third left a stray tmp file
    folder = tmp_path / "preempted"
    assert generate_chunks(model, diffusion, spec(), folder, DECODE, max_chunks=2) == [0, 1]
    (folder / f".{chunk_path(folder, 2).name}.tmp-99999").write_bytes(b"half a chunk")
    assert generate_chunks(model, diffusion, spec(), folder, DECODE) == [2, 3, 4]  # nothing repeated
    assert generate_chunks(model, diffusion, spec(), folder, DECODE) == []
    resumed = load_samples(merge_samples(folder, spec()))
    assert sorted(p.name for p in folder.iterdir()) == [GRID_PNG, SAMPLES_NPZ, "spec.json"]  # stray tmp removed

    # two ranks: rank 1 takes chunks 1, 3; rank 0 takes 0, 2, 4 and merges
    folder = tmp_path / "two_ranks"
    assert generate_chunks(model, diffusion, spec(), folder, DECODE, rank=1, world_size=2) == [1, 3]
    assert generate_samples(model, diffusion, spec(), folder, DECODE, rank=1, world_size=2) is None
    split = load_samples(generate_samples(model, diffusion, spec(), folder, DECODE, rank=0, world_size=2))

    for images, labels in (resumed, split):
        assert np.array_equal(images, straight[0]) and np.array_equal(labels, straight[1])
    assert len(np.unique(straight[0].reshape(25, -1), axis=0)) == 25  # every index drew its own noise


def test_a_different_seed_draws_different_images(model_and_diffusion, tmp_path):
    model, diffusion = model_and_diffusion
    a = load_samples(generate_samples(model, diffusion, spec(num_samples=5), tmp_path / "a", DECODE))[0]
    b = load_samples(generate_samples(model, diffusion, spec(num_samples=5, seed=4), tmp_path / "b", DECODE))[0]
    assert not np.array_equal(a, b)


def test_merged_samples_are_an_adm_batch_and_a_grid_with_one_class_per_column(model_and_diffusion, tmp_path):
    model, diffusion = model_and_diffusion
    npz = generate_samples(model, diffusion, spec(), tmp_path / "s", DECODE)
    assert npz == tmp_path / "s" / SAMPLES_NPZ
    with np.load(npz) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        images, labels = data["arr_0"], data["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (25, 16, 16, 3)
    assert np.array_equal(images[..., 0], images[..., 2])  # the digits decode to gray
    assert labels.tolist() == [i % 10 for i in range(25)]
    assert not list((tmp_path / "s").glob("chunk-*"))  # merged chunks are removed
    grid = Image.open(tmp_path / "s" / GRID_PNG)
    # 10 class columns, 3 rows (classes 0-4 have 3 samples): 16-pixel samples drawn 64 pixels wide, each under
    # a 14-pixel caption, 4 pixels apart (eval/grids.py)
    assert grid.size == (4 + 10 * (64 + 4), 4 + 3 * (14 + 64 + 4))


def test_random_labels_are_one_seeded_draw_whatever_the_split():
    random = spec(labels="random", num_samples=200, chunk_size=7)
    whole = class_labels(random, np.arange(200))
    by_chunk = np.concatenate([class_labels(random, random.chunk_indices(c)) for c in range(random.num_chunks)])
    assert np.array_equal(whole, by_chunk)
    assert set(whole.tolist()) == set(range(10)) and not np.array_equal(whole, np.arange(200) % 10)
    assert not np.array_equal(whole, class_labels(spec(labels="random", num_samples=200, seed=4), np.arange(200)))


def test_a_folder_of_other_settings_is_refused(tmp_path):
    open_sample_folder(tmp_path / "s", spec())
    open_sample_folder(tmp_path / "s", spec())  # same settings: resume
    with pytest.raises(SampleFolderError, match="other settings.*delete it"):
        open_sample_folder(tmp_path / "s", spec(cfg_scale=4.0))


def test_merging_with_missing_chunks_names_them(model_and_diffusion, tmp_path):
    model, diffusion = model_and_diffusion
    generate_chunks(model, diffusion, spec(), tmp_path / "s", DECODE, rank=0, world_size=2)
    with pytest.raises(SampleFolderError, match=r"lacks chunks \[1, 3\]"):
        merge_samples(tmp_path / "s", spec())
