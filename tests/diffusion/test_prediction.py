"""The prediction target (SPEC sections 3 and 4): training target, the MSE on it, the VB term and
the samplers' conversions, and the min-SNR form that follows from it."""

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from dtr_scale.config import ConfigError, WeightingConfig, to_train_config
from dtr_scale.diffusion.gaussian import GaussianDiffusion
from dtr_scale.diffusion.objective import TrainingObjective
from dtr_scale.diffusion.sampling import sample_latents
from dtr_scale.configs import CONFIG_DIR
from dtr_scale.train.components import build_objective

TARGETS = ("eps", "v", "x0")
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # DDPM's linear schedule, written out


def true_target(prediction, x0, noise, t):
    a = torch.from_numpy(np.sqrt(ABAR[t.numpy()])).float().view(-1, 1, 1, 1)
    s = torch.from_numpy(np.sqrt(1 - ABAR[t.numpy()])).float().view(-1, 1, 1, 1)
    return {"eps": noise, "v": a * noise - s * x0, "x0": x0}[prediction]


def draws(n=6):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 4, 4, 4, generator=g).clamp(-1, 1)
    noise = torch.randn(n, 4, 4, 4, generator=g)
    variance = torch.rand(n, 4, 4, 4, generator=g) * 2 - 1  # any learned-sigma output
    return x0, noise, variance, torch.tensor([0, 1, 10, 300, 700, 999])


class Oracle(torch.nn.Module):
    """Outputs the true target of `prediction` for the draws it was built with."""

    def __init__(self, prediction, x0, noise, variance):
        super().__init__()
        self.out = lambda t: torch.cat([true_target(prediction, x0, noise, t), variance], dim=1)

    def forward(self, x_t, t, y, force_drop_ids=None):
        return self.out(t)


def test_training_target_is_the_named_quantity():
    x0, noise, _, t = draws()
    for p in TARGETS:
        d = GaussianDiffusion.from_schedule("linear", prediction=p)
        torch.testing.assert_close(d.training_target(x0, t, noise), true_target(p, x0, noise, t))


@pytest.mark.parametrize("kind", ["uniform", "ant_uw"])
def test_an_oracle_has_zero_mse_and_the_same_vb_and_loss_for_every_target(kind):
    x0, noise, variance, t = draws()
    results = {}
    for p in TARGETS:
        objective = TrainingObjective(GaussianDiffusion.from_schedule("linear", prediction=p),
                                      WeightingConfig(kind=kind, num_intervals=2))
        results[p] = objective(Oracle(p, x0, noise, variance), x0, torch.zeros(6, dtype=torch.long), t, noise)
        assert results[p].mse.abs().max() < 1e-10
    for p in ("v", "x0"):
        torch.testing.assert_close(results[p].vb, results["eps"].vb, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(results[p].loss, results["eps"].loss, atol=1e-5, rtol=1e-5)
    assert results["eps"].vb.abs().max() > 1e-3  # a random variance: the VB term is not trivially 0


def test_the_mse_is_taken_on_the_target():
    x0, noise, variance, t = draws()
    eps_output = torch.cat([noise, variance], dim=1)  # an epsilon oracle's output
    x_t = GaussianDiffusion.from_schedule("linear").q_sample(x0, t, noise)
    for p in ("v", "x0"):
        d = GaussianDiffusion.from_schedule("linear", prediction=p)
        mse = d.training_losses(eps_output, x0, x_t, t, noise).mse
        expected = ((true_target(p, x0, noise, t) - noise) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(mse, expected)


def test_one_reverse_step_with_an_oracle_has_the_same_mean_for_every_target():
    x0, noise, variance, t = draws()
    means, eps_means = [], []
    for p in TARGETS:
        d = GaussianDiffusion.from_schedule("linear", prediction=p)
        x_t = d.q_sample(x0, t, noise)
        out = Oracle(p, x0, noise, variance).out(t)
        mean, logvar, x0_hat = d.p_mean_variance(out, x_t, t)
        torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=0)  # 1/sqrt(abar_999) amplifies rounding
        means.append(mean)
        # DDIM (eta = 0, no noise) one step from each t
        eps_means.append(d.ddim_sample(lambda x, tt: out, x_t, t, torch.zeros_like(x_t)))
    true_mean, _ = GaussianDiffusion.from_schedule("linear").q_posterior(x0, d.q_sample(x0, t, noise), t)
    for mean, ddim in zip(means, eps_means):
        torch.testing.assert_close(mean, true_mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ddim, eps_means[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction", TARGETS)
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_with_an_oracle_recover_a_point_mass_for_every_target(prediction, sampler):
    # Data is the single point x0 = c; the oracle outputs the target that c and x_t imply.
    d = GaussianDiffusion.from_schedule("linear", prediction=prediction).respaced(20, sampler)
    c = torch.full((1, 2, 2), 0.7)

    class PointMass(torch.nn.Module):
        num_classes = 1

        def forward(self, x, t, y):
            eps = (x - torch.from_numpy(np.sqrt(ABAR[t.numpy()])).float().view(-1, 1, 1, 1) * c) / torch.from_numpy(
                np.sqrt(1 - ABAR[t.numpy()])).float().view(-1, 1, 1, 1)
            return torch.cat([true_target(prediction, c.expand_as(x), eps, t), -torch.ones_like(x)], dim=1)

    out = sample_latents(PointMass(), d, torch.zeros(3, dtype=torch.long), shape=(1, 2, 2), cfg_scale=1.0,
                         sampler=sampler, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, c.expand(3, 1, 2, 2), atol=1e-3, rtol=0)


# min-SNR-5 at t = 0, 500, 999 on the linear schedule. SNR_0 = 0.9999 / 0.0001 = 9999;
# SNR_500 = 0.0843595, SNR_999 = 4.03599e-5 (abar_999 = 4.0358e-5).
MIN_SNR = {
    "eps": [5 / 9999, 1.0, 1.0],  # min(SNR, 5) / SNR
    "v": [5 / 10000, 0.0843595 / 1.0843595, 4.03599e-5 / (1 + 4.03599e-5)],  # min(SNR, 5) / (SNR + 1)
    "x0": [5.0, 0.0843595, 4.03599e-5],  # min(SNR, 5)
}


@pytest.mark.parametrize("prediction", TARGETS)
def test_min_snr_takes_its_form_from_the_diffusion_target(prediction):
    objective = TrainingObjective(GaussianDiffusion.from_schedule("linear", prediction=prediction),
                                  WeightingConfig(kind="min_snr", min_snr_gamma=5.0))
    w = objective.sample_weights(torch.tensor([0, 500, 999]))
    assert w.tolist() == pytest.approx(MIN_SNR[prediction], rel=1e-5)


def composed(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return to_train_config(compose(config_name="train", overrides=["run_dir=/tmp/unused", *overrides]))


def test_prediction_is_a_diffusion_setting_from_the_command_line():
    objective = build_objective(composed("weighting=min_snr", "diffusion.prediction=v"))
    assert objective.diffusion.prediction == "v"
    assert objective.sample_weights(torch.tensor([999])).item() == pytest.approx(MIN_SNR["v"][2], rel=1e-5)
    assert objective.diffusion.respaced(10).prediction == "v"  # the samplers convert the same target
    with pytest.raises(ConfigError, match=r"diffusion\.prediction: got 'score'"):
        composed("diffusion.prediction=score")
    # no second knob that could disagree: the old key is refused by name
    with pytest.raises((ConfigError, ConfigCompositionException), match=r"weighting\.prediction"):
        composed("weighting.prediction=v")
