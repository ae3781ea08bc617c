"""Gaussian diffusion (SPEC section 3): schedules, forward process, loss terms, respacing, samplers."""

import math

import numpy as np
import pytest
import torch

from dtr_scale.config import ConfigError, DiffusionConfig
from dtr_scale.diffusion.gaussian import GaussianDiffusion
from dtr_scale.diffusion.sampling import sample_latents
from dtr_scale.diffusion.schedules import cosine_betas, ddim_timesteps, linear_betas, space_timesteps


def test_linear_schedule_endpoints_and_abar():
    betas = linear_betas(1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    abar = np.cumprod(1 - betas)
    assert abar[-1] == pytest.approx(4.0358e-5, rel=1e-3)


def test_cosine_schedule_follows_its_alpha_bar():
    betas = cosine_betas(1000)
    abar = np.cumprod(1 - betas)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    assert abar[499] == pytest.approx(f(0.5) / f(0.0), rel=1e-6)
    assert betas.max() <= 0.999


def test_q_sample():
    d = GaussianDiffusion.from_schedule("linear")
    x0, noise = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    t = torch.tensor([0, 999])
    out = d.q_sample(x0, t, noise)
    abar = d.alphas_cumprod[[0, 999]]
    expected = np.sqrt(abar) + 2 * np.sqrt(1 - abar)
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor(expected, dtype=torch.float32))


def test_vb_is_zero_when_model_matches_the_true_posterior():
    d = GaussianDiffusion.from_schedule("linear")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 4, 4, generator=g), torch.randn(6, 4, 4, 4, generator=g)
    t = torch.tensor([1, 5, 100, 400, 800, 999])
    x_t = d.q_sample(x0, t, noise)
    # exact eps and v = -1 (the posterior variance) is the true posterior q(x_{t-1} | x_t, x_0)
    perfect = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    losses = d.training_losses(perfect, x0, x_t, t, noise)
    assert torch.all(losses.mse == 0)
    assert losses.vb.abs().max() < 1e-4
    # beta_t instead of the posterior variance: clearly wrong at small t, where the two differ most
    wrong = torch.cat([noise, torch.ones_like(noise)], dim=1)
    assert d.training_losses(wrong, x0, x_t, t, noise).vb[1] > 1e-2


def test_vb_gradient_does_not_reach_the_mean():
    d = GaussianDiffusion.from_schedule("linear")
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 500])
    out = torch.randn(2, 8, 4, 4, requires_grad=True)
    d.training_losses(out, x0, d.q_sample(x0, t, noise), t, noise).vb.sum().backward()
    assert torch.all(out.grad[:, :4] == 0) and out.grad[:, 4:].abs().sum() > 0


def test_respacing_keeps_original_alphas_and_maps_timesteps():
    d = GaussianDiffusion.from_schedule("linear")
    r = d.respaced(250)
    assert r.num_timesteps == 250
    assert r.timestep_map[0] == 0 and r.timestep_map[-1] == 999
    np.testing.assert_allclose(r.alphas_cumprod, d.alphas_cumprod[r.timestep_map], rtol=1e-12)
    assert space_timesteps(1000, 1000) == list(range(1000))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampler_feeds_the_model_original_timestep_indices(sampler):
    d = GaussianDiffusion.from_schedule("linear").respaced(10)
    seen = []

    class Recorder(torch.nn.Module):
        num_classes = 10

        def forward(self, x, t, y):
            seen.append(t[0].item())
            return torch.zeros(x.shape[0], 8, *x.shape[2:])

        def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=None):
            return self.forward(x, t, y)

    sample_latents(Recorder(), d, torch.tensor([1, 2]), shape=(4, 2, 2), cfg_scale=1.5, sampler=sampler)
    assert seen == list(d.timestep_map[::-1])
    assert seen[0] == 999 and seen[-1] == 0


def test_ddim_with_an_oracle_recovers_a_point_mass():
    # Data is the single point x0 = c: the exact eps is (x_t - sqrt(abar) c) / sqrt(1 - abar).
    d = GaussianDiffusion.from_schedule("linear", learn_sigma=False).respaced(20)
    c = torch.full((1, 2, 2), 0.7)

    class Oracle(torch.nn.Module):
        num_classes = 1

        def forward(self, x, t, y):
            abar = torch.from_numpy(np.cumprod(1 - linear_betas(1000))).float()[t].view(-1, 1, 1, 1)
            return (x - abar.sqrt() * c) / (1 - abar).sqrt()

    out = sample_latents(Oracle(), d, torch.zeros(3, dtype=torch.long), shape=(1, 2, 2), cfg_scale=1.0, sampler="ddim")
    torch.testing.assert_close(out, c.expand(3, 1, 2, 2), atol=1e-3, rtol=0)


def test_ddim_spacing_is_dits_ddimN():
    # DiT's space_timesteps(1000, "ddimN"): the smallest stride whose range from 0 has N steps
    assert ddim_timesteps(1000, 50) == list(range(0, 1000, 20))
    assert ddim_timesteps(1000, 50)[:3] == [0, 20, 40] and ddim_timesteps(1000, 50)[-1] == 980
    assert ddim_timesteps(1000, 25) == list(range(0, 1000, 40))
    assert ddim_timesteps(1000, 1000) == list(range(1000))
    r = GaussianDiffusion.from_schedule("linear").respaced(50, "ddim")
    assert r.timestep_map.tolist() == list(range(0, 1000, 20))
    # DDPM respacing is unchanged: evenly through 0..999
    assert GaussianDiffusion.from_schedule("linear").respaced(50).timestep_map.tolist() == [
        round(i * 999 / 49) for i in range(50)]
    with pytest.raises(ValueError, match=r"diffusion\.sampling_steps=300"):  # as DiT, no stride gives 300
        ddim_timesteps(1000, 300)


def test_a_ddim_step_count_without_a_stride_fails_at_config_time():
    with pytest.raises(ConfigError, match=r"diffusion\.sampling_steps=300: no integer stride"):
        DiffusionConfig(sampler="ddim", sampling_steps=300)
    assert DiffusionConfig(sampler="ddpm", sampling_steps=300).sampling_steps == 300
