"""Gradient-level multi-task methods over the k timestep-interval losses (SPEC section 4).

Both methods only need the Gram matrix G = g g^T of the k per-interval gradients
g_i (flattened over the model's parameters) to decide how to combine them: the
combined gradient is always sum_i w_i g_i for a weight vector w. So the trainer
can compute G from sharded gradients (local dot products, one all-reduce of a
k x k matrix) and never gather a full gradient.

- ANT-Nash (Navon et al. 2022, "Multi-Task Learning as a Bargaining Game", as in
  the ANT code's `mtl_library/nash.py`): alpha > 0 with (G alpha)_i = 1 / alpha_i,
  found by a sequence of convex problems, each linearising the concave part of the
  objective at the previous iterate.
- PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning"): each g_i is
  projected off every g_j it conflicts with (negative dot product), in a random
  order, and the projected gradients are summed.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from dtr_scale.extras import import_extra

log = logging.getLogger(__name__)

# The ANT code's stopping rule and solver budget for the sequence of convex problems.
NASH_RESIDUAL_TOL = 1e-3  # ||G alpha - 1 / alpha|| below this: the bargaining condition holds
NASH_STEP_TOL = 1e-6  # ||alpha_new - alpha|| below this: the sequence has stopped moving
NASH_SOLVER_MAX_ITERS = 100  # ECOS interior-point iterations per convex problem


def normalize_gram(gram: np.ndarray) -> tuple[np.ndarray, float]:
    # Nash-MTL: G / ||G||_F and the factor ||G||_F, which re-enters the constraints
    factor = float(np.linalg.norm(gram))
    return gram / factor, factor


def _nash_problem(k: int) -> tuple:
    """One convex step of Nash-MTL (Navon et al. 2022, section 3.2, "sequential convex" variant).

    With G the normalised Gram matrix, c its Frobenius norm and alpha' the previous iterate:
        minimise  sum(G alpha) + phi'(alpha') . alpha / c
        s.t.      log(alpha_i c) + log((G alpha)_i) >= 0   (alpha_i (c G alpha)_i >= 1)
    where phi'(alpha') = 1 / alpha' + (1 / (G alpha')) G is the gradient of the concave part
    phi(alpha) = sum_i log(alpha_i) + log((G alpha)_i). Written with parameters so cvxpy
    compiles the problem once (DPP) and each iterate only swaps values.
    """
    cp = import_extra("cvxpy")  # the [nash] extra: seconds to import, and only ANT-Nash needs it

    alpha = cp.Variable(k, nonneg=True)
    gram = cp.Parameter((k, k))
    linear = cp.Parameter(k)  # phi'(alpha') / c
    log_factor = cp.Parameter()  # log c
    g_alpha = gram @ alpha
    constraints = [-cp.log(alpha) - log_factor - cp.log(g_alpha) <= 0]
    problem = cp.Problem(cp.Minimize(cp.sum(g_alpha) + linear @ alpha), constraints)
    return problem, alpha, gram, linear, log_factor


def nash_weights(gram: np.ndarray, factor: float, previous: np.ndarray, max_iter: int = 20) -> np.ndarray:
    """Nash bargaining weights for the normalised Gram matrix `gram` (= G / factor).

    Warm-started from `previous`; at most `max_iter` convex problems; the ANT code's
    stopping rule: stop when the solver gives no answer, when ||G alpha - 1/alpha|| <
    1e-3 for the current iterate, or when a step moves alpha by less than 1e-6. The
    iterate at which the rule fires is returned (a failed solve keeps it).
    """
    cp = import_extra("cvxpy")

    k = len(previous)
    problem, alpha, gram_p, linear_p, log_factor_p = _nash_problem(k)
    gram_p.value, log_factor_p.value = gram, float(np.log(factor))
    current = np.asarray(previous, dtype=np.float64)
    for _ in range(max_iter):
        linear_p.value = (1.0 / current + (1.0 / (gram @ current)) @ gram) / factor
        alpha.value = current
        try:
            problem.solve(solver=cp.ECOS, warm_start=True, max_iters=NASH_SOLVER_MAX_ITERS)
        except cp.error.SolverError as err:
            log.warning("Nash-MTL: the convex step failed (%s); keeping alpha %s", err, current)
            alpha.value = current
        if (alpha.value is None
                or np.linalg.norm(gram @ current - 1.0 / (current + 1e-10)) < NASH_RESIDUAL_TOL
                or np.linalg.norm(alpha.value - current) < NASH_STEP_TOL):
            break
        current = np.asarray(alpha.value, dtype=np.float64)
    return current


def pcgrad_weights(gram: np.ndarray, orders: list[list[int]]) -> np.ndarray:
    """PCGrad (Yu et al. 2020, Algorithm 1) as weights w with sum_i g_i^PC = sum_j w_j g_j.

    g_i^PC starts as g_i and, for j in orders[i], loses its component along g_j when
    g_i^PC . g_j < 0: g_i^PC -= (g_i^PC . g_j) / |g_j|^2 g_j (projections against the
    original g_j, as the ANT code). Each g_i^PC stays a combination sum_j C_ij g_j, so
    every dot product is (C G)_ij and the whole method runs on the Gram matrix.
    """
    k = len(gram)
    coefficients = np.eye(k)
    for i in range(k):
        for j in orders[i]:
            dot = coefficients[i] @ gram[:, j]
            if dot < 0:
                coefficients[i, j] -= dot / gram[j, j]
    return coefficients.sum(0)


def pcgrad_orders(k: int, generator: torch.Generator) -> list[list[int]]:
    """For each task i, the random order in which it is projected against all k tasks."""
    return [torch.randperm(k, generator=generator).tolist() for _ in range(k)]


def conflicting_pairs(gram: np.ndarray) -> int:
    """How many pairs i < j of task gradients point against each other (g_i . g_j < 0)."""
    return int((np.triu(gram, 1) < 0).sum())


class NashState(nn.Module):
    """ANT-Nash's state between solves, as buffers so it travels with the checkpoint:
    the weights alpha (init 1), the latest ||G||_F and the step of the latest solve (-1: none)."""

    def __init__(self, num_intervals: int):
        super().__init__()
        self.register_buffer("alpha", torch.ones(num_intervals, dtype=torch.float64))
        self.register_buffer("normalization", torch.ones((), dtype=torch.float64))
        self.register_buffer("solved_at", torch.full((), -1, dtype=torch.int64))


def nash_weighted_loss(interval_losses: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    # ANT-Nash between solves: sum_i alpha_i L_i / k (ANT's NashMTL.__call__)
    return (alpha.to(interval_losses.dtype) * interval_losses).sum() / len(interval_losses)
