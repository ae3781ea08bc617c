"""routing.png: the heat map is the mask pixel for pixel, so the channels lit at t = 0 and
t = T-1 read back from the saved PNG are DTR's windows [s_t, s_t + C_beta)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dtr_scale.models.routing import dtr_mask, random_masks
from dtr_scale.plots.routing import DARK, LIT, draw_routing, write_routing_png


def lit_channels(pixels: np.ndarray, placement, t: int, channels: int) -> np.ndarray:
    """The channels whose cell is LIT in timestep t's row, every pixel of the cell checked."""
    row = placement.timesteps.index(t)
    top, left, w, h = placement.top + row * placement.cell_h, placement.left, placement.cell_w, placement.cell_h
    cells = pixels[top:top + h, left:left + channels * w].reshape(h, channels, w, 3)
    lit = (cells == LIT).all(axis=(0, 2, 3))
    dark = (cells == DARK).all(axis=(0, 2, 3))
    assert (lit | dark).all(), "a cell is neither lit nor dark: the heat map was resampled"
    return np.flatnonzero(lit)


@pytest.mark.parametrize("channels, beta, alpha", [(128, 0.8, 4.0), (48, 0.5, 1.0)])
def test_the_lit_columns_at_t0_and_tlast_are_the_dtr_windows(tmp_path, channels, beta, alpha):
    T = 1000
    tables = dtr_mask(channels, T, beta, alpha).numpy()[None].astype(bool)
    path = write_routing_png(tmp_path / "routing.png", tables, "dtr", beta, alpha)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    image, (placement,) = draw_routing(tables, "dtr", beta, alpha)
    assert pixels.shape[:2] == (image.height, image.width)
    assert placement.timesteps[0] == 0 and placement.timesteps[-1] == T - 1
    width = int(np.floor(beta * channels))
    # SPEC: s_0 = 0 and s_{T-1} = C - C_beta (the window slides to the last channels at the noisiest t)
    assert list(lit_channels(pixels, placement, 0, channels)) == list(range(0, width))
    assert list(lit_channels(pixels, placement, T - 1, channels)) == list(range(channels - width, channels))
    for t in placement.timesteps:  # every shown row is its mask row
        assert list(lit_channels(pixels, placement, t, channels)) == list(np.flatnonzero(tables[0, t]))


def test_random_routing_draws_each_blocks_masks_as_small_multiples(tmp_path):
    tables = random_masks(32, 3, 100, 0.75, seed=5).numpy().astype(bool)
    path = write_routing_png(tmp_path / "routing.png", tables, "random", 0.75, 4.0)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    _, placements = draw_routing(tables, "random", 0.75, 4.0)
    assert [p.table for p in placements] == [0, 1, 2]
    assert len({(p.left, p.top) for p in placements}) == 3  # side by side, not drawn over each other
    for block, placement in enumerate(placements):
        for t in (0, 99):
            assert list(lit_channels(pixels, placement, t, 32)) == list(np.flatnonzero(tables[block, t]))
    assert not np.array_equal(tables[0], tables[1])  # R-TR: every block routes differently
