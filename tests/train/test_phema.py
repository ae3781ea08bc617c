"""Post-hoc EMA (EDM2) and checkpoint averaging: known answers for each formula."""

import numpy as np
import pytest
import scipy.integrate
import torch
from torch import nn

from dtr_scale.train.phema import (
    MAX_STD,
    PowerFunctionEMA,
    average_state_dicts,
    exp_to_std,
    power_function_beta,
    power_function_inner_product,
    reconstruct,
    solve_posthoc_coefficients,
    std_to_exp,
)


def test_exp_to_std_of_uniform_average_is_one_over_sqrt_12():
    # gamma = 0 weighs [0, t] uniformly: the std of U(0, 1)
    assert exp_to_std(0.0) == pytest.approx(1 / np.sqrt(12))
    assert MAX_STD == pytest.approx(1 / np.sqrt(12))


def test_std_to_exp_matches_edm2_paper_values():
    # EDM2 sec. 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94
    assert std_to_exp(0.05) == pytest.approx(16.97, abs=0.005)
    assert std_to_exp(0.10) == pytest.approx(6.94, abs=0.005)


def test_std_to_exp_inverts_exp_to_std():
    gammas = np.array([[0.0, 0.5, 3.0], [16.97, 100.0, 2000.0]])
    np.testing.assert_allclose(std_to_exp(exp_to_std(gammas)), gammas, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("std", [0.0, -0.1, 0.3])
def test_std_outside_power_function_range_is_an_error(std):
    with pytest.raises(ValueError, match="sigma_rel"):
        std_to_exp(std)


def test_power_function_beta_starts_by_copying_the_model():
    assert power_function_beta(1, 6.94) == 0.0
    assert power_function_beta(10, 1.0) == pytest.approx(0.9**2)


def profile(tau, t, gamma):
    return (gamma + 1) * tau**gamma / t ** (gamma + 1) if tau <= t else 0.0


@pytest.mark.parametrize("t_a,g_a,t_b,g_b", [(100, 6.94, 100, 16.97), (40, 3.0, 100, 16.97), (100, 0.5, 30, 2.0), (7, 0.0, 7, 0.0)])
def test_inner_product_matches_numerical_integral(t_a, g_a, t_b, g_b):
    expected, _ = scipy.integrate.quad(lambda tau: profile(tau, t_a, g_a) * profile(tau, t_b, g_b), 0, min(t_a, t_b), limit=200)
    assert power_function_inner_product(t_a, g_a, t_b, g_b) == pytest.approx(expected, rel=1e-8)
    assert power_function_inner_product(t_b, g_b, t_a, g_a) == pytest.approx(expected, rel=1e-8)


def test_inner_product_of_uniform_profiles():
    # 1/t_a on [0, t_a] against 1/t_b on [0, t_b]: overlap min(t) / (t_a t_b) = 1 / max(t)
    assert power_function_inner_product(2.0, 0.0, 5.0, 0.0) == pytest.approx(1 / 5)


def test_update_weights_each_step_by_the_power_function_profile():
    # With theta_tau = one-hot e_tau the EMA vector is the weight of each step:
    # w_tau = (tau^(g+1) - (tau-1)^(g+1)) / t^(g+1), the profile integrated over (tau-1, tau]
    steps = 30
    model = nn.Linear(steps, 1, bias=False)
    ema = PowerFunctionEMA(model, stds=(0.1, 0.2))
    for step in range(1, steps + 1):
        model.weight.data = torch.eye(steps, dtype=torch.float32)[step - 1][None].clone()
        ema.update(step)
    tau = np.arange(1, steps + 1, dtype=np.float64)
    for gamma, state in zip(ema.gammas, ema.emas):
        expected = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / steps ** (gamma + 1)
        np.testing.assert_allclose(state["weight"][0].numpy(), expected, atol=1e-6)


def test_update_needs_a_step_count_from_one():
    with pytest.raises(ValueError, match=">= 1"):
        PowerFunctionEMA(nn.Linear(2, 2)).update(0)


def track_trajectory(trajectory, stds, snapshot_every):
    """Run PowerFunctionEMA over a parameter trajectory [T, D]; snapshots (step, gamma, sd) of the tracked EMAs
    and the final state of each directly tracked std."""
    model = nn.Linear(trajectory.shape[1], 1, bias=False)
    tracked = PowerFunctionEMA(model, stds=(0.05, 0.10))
    direct = PowerFunctionEMA(model, stds=stds)
    snapshots = []
    for step in range(1, len(trajectory) + 1):
        model.weight.data.copy_(trajectory[step - 1][None])
        tracked.update(step)
        direct.update(step)
        if step % snapshot_every == 0:
            snapshots += [(step, float(std_to_exp(std)), sd) for std, sd in tracked.snapshot().items()]
    return snapshots, tracked, direct


@pytest.fixture(scope="module")
def random_walk_run():
    trajectory = torch.cumsum(torch.randn(1000, 32, generator=torch.Generator().manual_seed(0)), dim=0)
    return (trajectory, *track_trajectory(trajectory, stds=(0.07, 0.15), snapshot_every=100))


def test_target_equal_to_a_snapshot_is_recovered_exactly(random_walk_run):
    _, snapshots, _, _ = random_walk_run
    profiles = [(step, gamma) for step, gamma, _ in snapshots]
    for j in (0, 7, len(profiles) - 1):
        np.testing.assert_allclose(solve_posthoc_coefficients(profiles, profiles[j]), np.eye(len(profiles))[j], atol=1e-9)
    last_step, _, last_state = snapshots[-1]  # the sigma_rel 0.10 EMA at the last step
    rebuilt = reconstruct(snapshots, target_std=0.10, at_step=last_step)
    torch.testing.assert_close(rebuilt["weight"], last_state["weight"], rtol=0, atol=1e-4)


def test_reconstruction_matches_exact_ema_at_new_sigma_rel(random_walk_run):
    # Tolerance: 1% of how far the exact EMA lags the current weights, and 20x closer than the
    # nearest tracked EMA (the answer without post-hoc reconstruction).
    trajectory, snapshots, tracked, direct = random_walk_run
    for std, exact in zip(direct.stds, direct.emas):
        rebuilt = reconstruct(snapshots, target_std=std, at_step=len(trajectory))["weight"]
        error = (rebuilt - exact["weight"]).abs().max().item()
        lag = (exact["weight"] - trajectory[-1]).abs().max().item()
        nearest = min((ema["weight"] - exact["weight"]).abs().max().item() for ema in tracked.emas)
        assert error < 0.01 * lag
        assert error < 0.05 * nearest


def test_solve_needs_snapshots():
    with pytest.raises(ValueError, match="at least one snapshot"):
        solve_posthoc_coefficients([], (10, 1.0))


def test_state_dict_round_trip_and_std_mismatch():
    model = nn.Linear(3, 2)
    ema = PowerFunctionEMA(model)
    for step in range(1, 4):
        model.weight.data.add_(1.0)
        ema.update(step)
    restored = PowerFunctionEMA(nn.Linear(3, 2))
    restored.load_state_dict(ema.state_dict())
    for a, b in zip(ema.emas, restored.emas):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="stds"):
        PowerFunctionEMA(nn.Linear(3, 2), stds=(0.2,)).load_state_dict(ema.state_dict())


def test_snapshot_is_a_detached_cpu_copy():
    model = nn.Linear(3, 2)
    ema = PowerFunctionEMA(model, stds=(0.05,))
    snap = ema.snapshot()[0.05]
    ema.emas[0]["weight"].add_(1.0)
    assert not torch.equal(snap["weight"], ema.emas[0]["weight"])


def test_average_state_dicts_is_the_mean_and_keeps_integer_buffers():
    window = [{"w": torch.full((2,), float(i)), "count": torch.tensor(i)} for i in (1, 2, 6)]
    averaged = average_state_dicts(window)
    torch.testing.assert_close(averaged["w"], torch.full((2,), 3.0))
    assert averaged["count"].item() == 6 and averaged["count"].dtype == torch.int64


def test_average_state_dicts_rejects_different_models():
    with pytest.raises(KeyError, match="same model"):
        average_state_dicts([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])


def edm2_posthoc_coefficients(steps, stds, target_step, target_std):
    # EDM2 training/phema.py, written out independently: p_dot_p, np.linalg.solve, X / X.sum(0)
    def p_dot_p(t_a, g_a, t_b, g_b):
        t_exp = np.where(t_a < t_b, g_b, -g_a)
        return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** t_exp / ((g_a + g_b + 1) * np.maximum(t_a, t_b))

    steps, gammas = np.float64(steps), np.float64(std_to_exp(np.float64(stds)))
    a = p_dot_p(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    b = p_dot_p(steps[:, None], gammas[:, None], np.float64([[target_step]]), std_to_exp(np.float64([[target_std]])))
    x = np.linalg.solve(a, b)
    return (x / x.sum(axis=0))[:, 0]


@pytest.mark.parametrize("target_step, target_std", [(400, 0.07), (400, 0.13), (300, 0.05)])
def test_coefficients_equal_edm2_normalised_solution_on_a_small_grid(target_step, target_std):
    steps = [100, 100, 200, 200, 300, 300, 400, 400]
    stds = [0.05, 0.10] * 4
    profiles = [(s, float(std_to_exp(std))) for s, std in zip(steps, stds)]
    got = solve_posthoc_coefficients(profiles, (target_step, float(std_to_exp(target_std))))
    np.testing.assert_allclose(got, edm2_posthoc_coefficients(steps, stds, target_step, target_std), rtol=1e-6, atol=1e-9)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)


def test_averaging_identical_snapshots_returns_them_unchanged():
    # the unnormalised least-squares weights summed to ~1.001 here and gave 5.0051 for 5.0
    state = {"constant": torch.full((3,), 5.0), "table": torch.linspace(-1, 1, 7)}
    snapshots = [(step, float(std_to_exp(std)), state) for step in (100, 200, 300, 400) for std in (0.05, 0.10)]
    rebuilt = reconstruct(snapshots, target_std=0.13, at_step=400)
    torch.testing.assert_close(rebuilt["constant"], state["constant"], rtol=0, atol=1e-6)
    torch.testing.assert_close(rebuilt["table"], state["table"], rtol=0, atol=1e-6)
