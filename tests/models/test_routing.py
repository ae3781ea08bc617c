"""The DTR mask table (SPEC section 2) and its R-TR ablation."""

import numpy as np
import pytest
import torch

from dtr_scale.models.routing import TaskRouting, active_width, dtr_mask, dtr_window_starts, random_masks

# Window starts s_t at t = 0/250/500/750/999, from SPEC section 2.
SPEC_STARTS = {768: [0, 1, 10, 49, 154], 1024: [0, 1, 13, 65, 205], 1152: [0, 1, 14, 73, 231]}


@pytest.mark.parametrize("channels", sorted(SPEC_STARTS))
def test_window_starts_match_spec(channels):
    starts = dtr_window_starts(channels, 1000, beta=0.8, alpha=4.0)
    assert starts[[0, 250, 500, 750, 999]].tolist() == SPEC_STARTS[channels]


@pytest.mark.parametrize("channels", sorted(SPEC_STARTS))
def test_every_row_is_one_contiguous_window_of_c_beta(channels):
    m = dtr_mask(channels)
    c_beta = int(np.floor(0.8 * channels))
    assert m.shape == (1000, channels) and m.dtype == torch.float32
    assert torch.all(m.sum(1) == c_beta)
    starts = torch.from_numpy(dtr_window_starts(channels))
    first_one = m.argmax(1)
    assert torch.equal(first_one, starts)  # the window begins at s_t and is contiguous (row sum = width)
    assert m[0, :c_beta].all() and m[-1, channels - c_beta:].all()


def test_adjacent_timesteps_share_almost_all_channels_dit_l():
    m = dtr_mask(1024)
    overlap = (m[1:] * m[:-1]).sum(1)
    assert overlap.min() >= active_width(1024, 0.8) - 1


def test_round_half_to_even():
    # C = 10, beta = 0.5: slide 5; t/(T-1) = 0.5 with alpha 1 gives 2.5, which numpy rounds to 2.
    assert dtr_window_starts(10, num_timesteps=3, beta=0.5, alpha=1.0).tolist() == [0, 2, 5]


def test_beta_one_is_all_ones():
    assert torch.all(dtr_mask(96, beta=1.0) == 1)


def test_random_routing_is_seeded_per_block_and_has_c_beta_channels():
    a = random_masks(64, depth=3, num_timesteps=50, beta=0.75, seed=1)
    assert a.shape == (3, 50, 64) and torch.all(a.sum(-1) == 48)
    assert torch.equal(a, random_masks(64, depth=3, num_timesteps=50, beta=0.75, seed=1))
    assert not torch.equal(a, random_masks(64, depth=3, num_timesteps=50, beta=0.75, seed=2))
    assert not torch.equal(a[0], a[1])  # each block draws its own subsets


def test_task_routing_indexes_each_samples_timestep():
    routing = TaskRouting("dtr", channels=32, depth=2, num_timesteps=100, beta=0.5, alpha=2.0)
    t = torch.tensor([0, 99, 40])
    masks = routing(t, torch.float32)
    table = dtr_mask(32, 100, 0.5, 2.0)
    assert len(masks) == 2 and masks[0][0].shape == (3, 1, 32)
    for i, ti in enumerate(t.tolist()):
        keep, drop = masks[1]
        assert torch.equal(keep[i, 0], table[ti]) and torch.equal(drop[i, 0], 1 - table[ti])
    assert routing.state_dict() == {}  # tables are rebuilt from config, never checkpointed
