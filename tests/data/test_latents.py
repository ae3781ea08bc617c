import numpy as np
import torch

from dtr_scale.data.latents import draw_key, draw_noise_and_flips, sample_latents


def test_draws_depend_on_seed_epoch_and_position_only():
    assert draw_key(0, 1, 2) == draw_key(0, 1, 2)
    assert len({draw_key(0, 1, 2)[0], draw_key(1, 1, 2)[0], draw_key(0, 2, 2)[0], draw_key(0, 1, 3)[0]}) == 4
    flips = [draw_key(0, 0, p)[1] for p in range(2000)]
    assert 900 < sum(flips) < 1100


def test_a_sample_gets_the_same_noise_in_any_batch():
    alone, flip_alone = draw_noise_and_flips(3, 1, np.array([17]), (4, 8, 8))
    batch, flips = draw_noise_and_flips(3, 1, np.array([5, 17, 9]), (4, 8, 8))
    assert torch.equal(batch[1], alone[0]) and flips[1] == flip_alone[0]
    many, _ = draw_noise_and_flips(3, 1, np.arange(512), (4, 8, 8))
    assert abs(many.mean().item()) < 0.01 and abs(many.std().item() - 1) < 0.01


def test_sample_latents_is_scaled_mean_plus_std_times_eps():
    views = np.zeros((2, 2, 1, 1), np.float16)  # [B, mean|std (C = 1), h, w]
    views[0, 0], views[0, 1] = 1.0, 0.5
    views[1, 0], views[1, 1] = -2.0, 0.25
    eps = torch.tensor([2.0, 4.0]).reshape(2, 1, 1, 1)
    latents = sample_latents(views, eps, scale_factor=0.5)
    assert latents.dtype == torch.float32
    np.testing.assert_allclose(latents.flatten(), [0.5 * (1 + 0.5 * 2), 0.5 * (-2 + 0.25 * 4)])
