"""The training objective (SPEC section 4): what each weighting weighs. ANT-UW weighs each
interval's whole loss MSE + VB; min-SNR and P2 weigh the MSE and add the VB term unweighted."""

import numpy as np
import pytest
import torch

from dtr_scale.config import WeightingConfig
from dtr_scale.diffusion.gaussian import GaussianDiffusion
from dtr_scale.diffusion.objective import TrainingObjective

K = 4


class Deterministic(torch.nn.Module):
    """A fixed, input-dependent learned-sigma output, so the loss terms are reproducible."""

    def forward(self, x_t, t, y, force_drop_ids=None):
        return torch.cat([0.5 * x_t + 0.1, torch.tanh(x_t)], dim=1)


def draws():
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([3, 300, 600, 900, 100, 400, 700, 999])  # two per interval of 4 uniform ones
    return torch.randn(8, 4, 4, 4, generator=g), torch.zeros(8, dtype=torch.long), t, torch.randn(8, 4, 4, 4, generator=g)


def per_sample_terms(x0, t, noise):
    d = GaussianDiffusion.from_schedule("linear")
    x_t = d.q_sample(x0, t, noise)
    terms = d.training_losses(Deterministic()(x_t, t, None), x0, x_t, t, noise)
    return terms.mse, terms.vb


def official_ant_uw(mse, vb, t, log_vars):
    # DTR's training_losses: loss = mse + vb; L_i = loss[interval i].mean() / k;
    # total = sum_i 0.5 * (exp(-s_i) L_i + s_i)
    total = 0.0
    for i in range(K):
        in_i = (t >= 250 * i) & (t < 250 * (i + 1))
        L = (mse + vb)[in_i].mean().item() / K
        total += 0.5 * (np.exp(-log_vars[i]) * L + log_vars[i])
    return total


def test_ant_uw_weighs_mse_plus_vb_as_the_official_code():
    x0, y, t, noise = draws()
    mse, vb = per_sample_terms(x0, t, noise)
    assert vb.min() > 1e-3  # the VB term is not negligible here, so leaving it out would show
    objective = TrainingObjective(GaussianDiffusion.from_schedule("linear"), WeightingConfig(kind="ant_uw", num_intervals=K))
    at_init = objective(Deterministic(), x0, y, t, noise).loss
    assert at_init.item() == pytest.approx(official_ant_uw(mse, vb, t, [0.0] * K), rel=1e-6)
    # s = 0 and equal interval counts: 0.5 x mean(MSE + VB), not 0.5 x mean(MSE) + mean(VB)
    assert at_init.item() == pytest.approx(0.5 * (mse + vb).mean().item(), rel=1e-6)
    assert at_init.item() < 0.5 * mse.mean().item() + vb.mean().item() - 1e-3
    # with learned log-variances
    s = [0.3, -0.2, 1.0, -1.5]
    with torch.no_grad():
        objective.uw.log_vars.copy_(torch.tensor(s))
    out = objective(Deterministic(), x0, y, t, noise)
    assert out.loss.item() == pytest.approx(official_ant_uw(mse, vb, t, s), rel=1e-6)
    # d total / d s_i = 0.5 (1 - exp(-s_i) L_i), with L_i over MSE + VB
    out.loss.backward()
    L = torch.stack([(mse + vb)[(t >= 250 * i) & (t < 250 * (i + 1))].mean() / K for i in range(K)])
    torch.testing.assert_close(objective.uw.log_vars.grad, 0.5 * (1 - torch.exp(-torch.tensor(s)) * L))


@pytest.mark.parametrize("kind,weight", [
    ("min_snr", lambda snr: torch.clamp(snr, max=5.0) / snr),
    ("p2", lambda snr: 1.0 / (1.0 + snr)),
    ("uniform", lambda snr: torch.ones_like(snr)),
])
def test_per_sample_weights_weigh_the_mse_and_add_vb_unweighted(kind, weight):
    x0, y, t, noise = draws()
    mse, vb = per_sample_terms(x0, t, noise)
    abar = torch.from_numpy(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t.numpy()])
    w = weight(abar / (1 - abar)).float()
    objective = TrainingObjective(GaussianDiffusion.from_schedule("linear"), WeightingConfig(kind=kind, num_intervals=K))
    loss = objective(Deterministic(), x0, y, t, noise).loss
    assert loss.item() == pytest.approx((w * mse).mean().item() + vb.mean().item(), rel=1e-6)
