"""ANT-Nash's bargaining weights and PCGrad's projections, on known answers, from the Gram matrix alone."""

import numpy as np
import pytest
import torch

from dtr_scale.diffusion.mtl import (
    NashState,
    conflicting_pairs,
    nash_weighted_loss,
    nash_weights,
    normalize_gram,
    pcgrad_orders,
    pcgrad_weights,
)


def solve(grads: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
    normalized, factor = normalize_gram(grads @ grads.T)
    return nash_weights(normalized, factor, np.ones(len(grads)) if previous is None else previous)


def test_orthogonal_gradients_get_weights_inverse_to_their_norms():
    # G = diag(n_i^2): alpha_i n_i^2 = 1 / alpha_i, so alpha_i = 1 / n_i
    norms = np.array([1.0, 2.0, 0.5, 4.0])
    grads = np.zeros((4, 7))
    grads[np.arange(4), [0, 2, 3, 6]] = norms
    np.testing.assert_allclose(solve(grads), 1 / norms, rtol=1e-5)


@pytest.mark.parametrize("angle_deg", [30.0, 80.0, 120.0])
def test_two_tasks_at_an_angle_satisfy_the_bargaining_condition(angle_deg):
    theta = np.deg2rad(angle_deg)
    grads = np.array([[3.0, 0.0, 0.0], [0.5 * np.cos(theta), 0.5 * np.sin(theta), 0.0]])
    gram = grads @ grads.T
    alpha = solve(grads)
    assert (alpha > 0).all()
    np.testing.assert_allclose(gram @ alpha, 1 / alpha, rtol=1e-4)  # (G alpha)_i = 1 / alpha_i
    # the combined direction d = sum alpha_i g_i has the same projection-times-weight on every task
    d = alpha @ grads
    np.testing.assert_allclose(alpha * (grads @ d), 1.0, rtol=1e-4)


def test_many_tasks_converge_from_a_warm_start_and_stay_there():
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(8, 40)) + 0.5  # correlated, some pairs conflicting
    alpha = solve(grads)
    gram = grads @ grads.T
    np.testing.assert_allclose(gram @ alpha, 1 / alpha, rtol=1e-4)
    # warm-started at the answer, the stopping rule fires at once and returns it unchanged
    normalized, factor = normalize_gram(gram)
    again = nash_weights(normalized, factor, alpha, max_iter=20)
    np.testing.assert_allclose(again, alpha, rtol=1e-5)


def pcgrad_on_vectors(grads: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """PCGrad written on the gradient vectors (Yu et al. 2020, Algorithm 1), to check the Gram form."""
    projected = grads.clone()
    for i in range(len(grads)):
        for j in orders[i]:
            dot = projected[i] @ grads[j]
            if dot < 0:
                projected[i] -= dot / grads[j].norm() ** 2 * grads[j]
    return projected.sum(0)


def test_two_conflicting_gradients_give_the_analytic_projected_sum():
    grads = np.array([[1.0, 0.0], [-1.0, 1.0]])  # g1 . g2 = -1
    # g1 - (g1.g2)/|g2|^2 g2 = (0.5, 0.5); g2 - (g2.g1)/|g1|^2 g1 = (0, 1)
    weights = pcgrad_weights(grads @ grads.T, [[0, 1], [1, 0]])
    np.testing.assert_allclose(weights @ grads, [0.5, 1.5])
    assert conflicting_pairs(grads @ grads.T) == 1


def test_gradients_that_do_not_conflict_pass_unchanged():
    grads = np.array([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])  # all dot products >= 0
    weights = pcgrad_weights(grads @ grads.T, [[2, 1, 0], [0, 2, 1], [1, 0, 2]])
    np.testing.assert_array_equal(weights, np.ones(3))
    assert conflicting_pairs(grads @ grads.T) == 0


def test_gram_form_equals_pcgrad_on_the_vectors_in_any_order():
    generator = torch.Generator().manual_seed(0)
    grads = torch.randn(6, 50, generator=generator, dtype=torch.float64)
    grads[3] = -0.8 * grads[0] + 0.2 * grads[3]  # make sure some pairs conflict
    gram = (grads @ grads.T).numpy()
    for seed in range(3):
        orders = pcgrad_orders(6, torch.Generator().manual_seed(seed))
        expected = pcgrad_on_vectors(grads, orders)
        combined = torch.from_numpy(pcgrad_weights(gram, orders)) @ grads
        torch.testing.assert_close(combined, expected, rtol=1e-10, atol=1e-10)


def test_projection_orders_are_a_function_of_the_seed():
    orders = pcgrad_orders(8, torch.Generator().manual_seed(42))
    assert orders == pcgrad_orders(8, torch.Generator().manual_seed(42))
    assert all(sorted(order) == list(range(8)) for order in orders)
    assert orders != pcgrad_orders(8, torch.Generator().manual_seed(43))


def test_between_solves_the_loss_is_the_alpha_weighted_mean_and_the_state_is_saved():
    state = NashState(4)
    assert set(state.state_dict()) == {"alpha", "normalization", "solved_at"}  # all go into the checkpoint
    state.alpha.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    losses = torch.tensor([0.5, 0.25, 1.0, 2.0])
    assert nash_weighted_loss(losses, state.alpha).item() == pytest.approx((0.5 + 0.5 + 3.0 + 8.0) / 4)
