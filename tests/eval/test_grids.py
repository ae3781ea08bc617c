"""Sample pictures: every cell of a grid is its sample enlarged exactly (nearest-neighbour, an
integer factor) under a caption naming its class; the strip shows the same samples (same seeds
and labels) at each evaluated checkpoint, one row per step."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dtr_scale.eval.generate import GRID_PNG, grid_order, write_grid
from dtr_scale.eval.grids import STRIP_NAME, labelled_grid, upscale, upscale_factor, write_checkpoint_strip
from dtr_scale.eval.results import append_result, read_results

SETTINGS = {"averaging": "ema", "sampler": "ddpm", "sampling_steps": 50, "cfg_scale": 1.5, "guided_channels": "all",
            "ddim_eta": 0.0, "num_samples": 30, "labels": "balanced", "seed": 0, "reference": "digits"}


def digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random 16 x 16 RGB 'samples' with balanced labels 0..9."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), np.arange(n) % 10


def test_upscaling_repeats_each_pixel_into_a_block():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    big = upscale(image, 4)
    assert big.shape == (8, 12, 3)
    assert (big[4:8, 8:12] == image[1, 2]).all() and (big[0:4, 0:4] == image[0, 0]).all()
    assert upscale_factor(16) == 4 and upscale_factor(8) == 8 and upscale_factor(256) == 1


def test_each_cell_of_the_saved_grid_is_its_sample_upscaled_exactly(tmp_path):
    images, labels = digits(30)
    path = write_grid(tmp_path / GRID_PNG, images, labels, num_classes=10)
    saved = np.asarray(Image.open(path).convert("RGB"))
    order = grid_order(labels, 10)
    image, cells = labelled_grid(images, labels, order, 10)
    assert saved.shape == (image.height, image.width, 3)
    assert [c.index for c in cells] == order  # three rows, one column per class
    assert saved.shape[1] >= 10 * 64 and saved.shape[0] >= 3 * 64  # readable: 16-pixel digits drawn 64 pixels wide
    for cell in cells:
        expected = np.repeat(np.repeat(images[cell.index], 4, axis=0), 4, axis=1)
        assert np.array_equal(saved[cell.top:cell.top + 64, cell.left:cell.left + 64], expected)
        caption = saved[cell.top - 14:cell.top, cell.left:cell.left + 64]
        assert (caption != 255).any()  # the class is written above the cell


def test_the_caption_names_the_class(tmp_path):
    images, labels = digits(20)
    image, cells = labelled_grid(images, labels, grid_order(labels, 10), 10)
    saved = np.asarray(image)
    # the same caption text gives the same pixels: cells of one class share their caption, others differ
    caption = {c.index: saved[c.top - 14:c.top, c.left:c.left + 64].tobytes() for c in cells}
    assert caption[3] == caption[13] and caption[3] != caption[4]


def write_samples(folder, images, labels):
    folder.mkdir(parents=True)
    np.savez(folder / "samples.npz", arr_0=images, arr_1=labels)
    return folder / "samples.npz"


def test_the_strip_shows_the_same_samples_at_each_checkpoint(tmp_path):
    steps = (300, 600, 900)
    samples = {step: digits(30, seed=step) for step in steps}
    for step in (900, 300, 600):  # stored out of step order, as evaluators finish
        npz = write_samples(tmp_path / "eval" / "samples" / f"step_{step:08d}-ema", *samples[step])
        append_result(tmp_path, {"step": step, **SETTINGS, "digits_fd": 1.0, "samples": str(npz)})
    # other sampler settings at step 600 are not mixed into the rows
    other = write_samples(tmp_path / "eval" / "samples" / "other", *digits(30, seed=1))
    append_result(tmp_path, {"step": 600, **SETTINGS, "sampling_steps": 10, "digits_fd": 1.0, "samples": str(other)})
    path = write_checkpoint_strip(tmp_path, read_results(tmp_path))
    assert path == tmp_path / "eval" / STRIP_NAME
    saved = np.asarray(Image.open(path).convert("RGB"))
    stacked = np.concatenate([samples[s][0][:10] for s in steps])
    image, cells = labelled_grid(stacked, np.tile(np.arange(10), 3), list(range(30)), 10, row_labels=["x"] * 3)
    assert saved.shape == (image.height, image.width, 3)
    for cell in cells:  # row r = steps[r]; column c = sample c (class c) of that checkpoint
        step, column = steps[cell.index // 10], cell.index % 10
        expected = upscale(samples[step][0][column], 4)
        assert np.array_equal(saved[cell.top:cell.top + 64, cell.left:cell.left + 64], expected)


def test_no_samples_no_strip(tmp_path):
    assert write_checkpoint_strip(tmp_path, read_results(tmp_path)) is None


def test_each_evaluations_grid_is_logged_to_wandb(tmp_path):
    from dtr_scale.config import to_train_config
    from dtr_scale.eval.results import log_to_wandb

    folder = tmp_path / "eval" / "samples" / "step_00000300-ema"
    npz = write_samples(folder, *digits(20))
    write_grid(folder / GRID_PNG, *digits(20), num_classes=10)
    log_to_wandb(tmp_path, to_train_config({"logging": {"wandb": "offline"}}),
                 [{"step": 300, **SETTINGS, "digits_fd": 1.0, "samples": str(npz)}])
    (run,) = (tmp_path / "eval" / "wandb").glob("offline-run-*")
    assert [p.name.split("_")[0] for p in (run / "files" / "media" / "images" / "samples").glob("*.png")] == ["ema"]
