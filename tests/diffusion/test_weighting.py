"""Loss weighting formulas of SPEC section 4, against hand-computed values."""

import itertools

import numpy as np
import pytest
import torch

from dtr_scale.diffusion.schedules import make_betas, snr
from dtr_scale.diffusion.weighting import (
    UncertaintyWeighting,
    interval_index,
    interval_means,
    min_snr_weight,
    p2_weight,
    interval_boundaries,
    partition_cost,
    snr_dp_intervals,
    snr_median_costs,
    snr_optimal_intervals,
    stratified_timesteps,
    uncertainty_weighted_loss,
    uniform_intervals,
)

SNR = torch.tensor([0.0, 1.0, 5.0, 10.0])


def test_min_snr_eps_v_x0():
    assert min_snr_weight(SNR, 5.0, "eps").tolist() == pytest.approx([1.0, 1.0, 1.0, 0.5])
    assert min_snr_weight(SNR, 5.0, "v").tolist() == pytest.approx([1.0, 0.5, 5 / 6, 5 / 11])
    assert min_snr_weight(SNR, 5.0, "x0").tolist() == pytest.approx([1.0, 1.0, 5.0, 5.0])
    assert torch.isfinite(min_snr_weight(SNR, 5.0, "eps")).all()  # SNR = 0 guarded


def test_p2():
    assert p2_weight(torch.tensor([3.0, 0.0]), gamma=0.5, k=1.0).tolist() == pytest.approx([0.5, 1.0])
    assert p2_weight(torch.tensor([1.0]), gamma=1.0, k=1.0).item() == pytest.approx(0.5)


def test_uniform_intervals():
    assert uniform_intervals(1000, 8).tolist() == [0, 125, 250, 375, 500, 625, 750, 875, 1000]
    assert uniform_intervals(1000, 3).tolist() == [0, 333, 666, 1000]


def test_interval_index():
    b = torch.tensor([0, 125, 250, 1000])
    assert interval_index(torch.tensor([0, 124, 125, 249, 250, 999]), b).tolist() == [0, 0, 1, 1, 2, 2]


def ant_interval_cost(snr, bounds):
    # ANT's `calculate_interval_loss`, summed over the intervals [l, r] that `bounds` delimit
    total = 0.0
    for left, end in zip(bounds[:-1], bounds[1:]):
        right = end - 1
        center = round((left + right + 1) / 2)
        total += np.abs(snr[left:right + 1] - snr[center]).sum()
    return total


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_snr_intervals_minimise_ants_cost_over_every_partition(k):
    rng = np.random.default_rng(k)
    for _ in range(5):
        values = np.sort(rng.exponential(size=9))[::-1] * 100  # a non-increasing SNR
        # ANT's split search: the first interval holds at least two timesteps
        candidates = [[0, *cuts, 9] for cuts in itertools.combinations(range(2, 9), k - 1)]
        best = min(candidates, key=lambda b: ant_interval_cost(values, b))
        assert snr_dp_intervals(values, k).tolist() == best


# ANT's `snr_based_clustering` prints these interval starts for k = 8; each printed start after the
# first is one step before the start of the partition its DP optimised (its off-by-one).
ANT_PRINTED = {"linear": [0, 1, 2, 5, 10, 18, 37, 94], "cosine": [0, 1, 2, 5, 10, 20, 43, 112]}
ANT_DP_COST = {"linear": 9092.598173499178, "cosine": 24371.992605229603}  # its D[-1, k - 1]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_snr_intervals_on_the_real_schedules_are_ants_partition(schedule):
    values = snr(np.cumprod(1 - make_betas(schedule, 1000)))
    bounds = snr_dp_intervals(values, 8).tolist()
    ant_partition = [0] + [start + 1 for start in ANT_PRINTED[schedule][1:]] + [1000]
    assert bounds == ant_partition
    assert ant_interval_cost(values, bounds) == pytest.approx(ANT_DP_COST[schedule], rel=1e-9)
    assert bounds[-2] < 120  # SPEC: nearly all of T falls in the last interval


def test_snr_intervals_refuse_an_increasing_snr():
    with pytest.raises(ValueError, match="does not increase"):
        snr_dp_intervals(np.array([1.0, 2.0, 3.0]), 2)


def paper_interval_cost(snr, bounds):
    # the ANT paper's SNR clustering cost, summed over the intervals: each interval's least
    # absolute deviation from one of its own SNRs (found here by trying every one)
    return sum(min(np.abs(snr[left:end] - snr[c]).sum() for c in range(left, end))
               for left, end in zip(bounds[:-1], bounds[1:]))


@pytest.mark.parametrize("k", [1, 2, 3, 5, 9])
def test_snr_optimal_minimises_the_papers_objective_over_every_partition_into_non_empty_intervals(k):
    rng = np.random.default_rng(10 + k)
    for _ in range(5):
        values = np.sort(rng.exponential(size=9))[::-1] * 100
        candidates = [[0, *cuts, 9] for cuts in itertools.combinations(range(1, 9), k - 1)]
        best = min(candidates, key=lambda b: paper_interval_cost(values, b))
        found = snr_optimal_intervals(values, k)
        assert found.tolist() == best
        assert partition_cost(snr_median_costs(values), found) == pytest.approx(paper_interval_cost(values, best))


# The exact optimum of the paper's objective for k = 8 (the enumeration above checks the programme;
# these pin the schedules): it starts [0, 1, 2, 3, ...], where ANT's programme cannot go.
OPTIMAL = {"linear": ([0, 1, 2, 3, 6, 11, 24, 63, 1000], 4250.971086709131),
           "cosine": ([0, 1, 2, 3, 6, 13, 28, 77, 1000], 13672.03915749598)}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_snr_optimal_on_the_real_schedules_beats_ants_programme_on_the_papers_objective(schedule):
    values = snr(np.cumprod(1 - make_betas(schedule, 1000)))
    bounds, cost = OPTIMAL[schedule]
    assert snr_optimal_intervals(values, 8).tolist() == bounds
    assert paper_interval_cost(values, bounds) == pytest.approx(cost, rel=1e-9)
    assert cost < 0.6 * paper_interval_cost(values, snr_dp_intervals(values, 8).tolist())


def test_snr_optimal_splits_into_singletons_at_k_equal_t_and_refuses_more():
    values = np.array([9.0, 4.0, 1.0])
    assert snr_optimal_intervals(values, 3).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="num_intervals=4"):
        snr_optimal_intervals(values, 4)


def test_interval_boundaries_names_each_clustering():
    values = snr(np.cumprod(1 - make_betas("linear", 1000)))
    assert interval_boundaries("uniform", values, 8).tolist() == uniform_intervals(1000, 8).tolist()
    assert interval_boundaries("snr_dp", values, 8).tolist() == snr_dp_intervals(values, 8).tolist()
    assert interval_boundaries("snr_optimal", values, 8).tolist() == OPTIMAL["linear"][0]
    with pytest.raises(ValueError, match="snr_optimal"):
        interval_boundaries("kmeans", values, 8)


def test_stratified_sampling_puts_batch_over_k_in_each_interval():
    b = torch.from_numpy(uniform_intervals(1000, 8))
    t = stratified_timesteps(64, b, torch.Generator().manual_seed(0))
    assert torch.equal(torch.bincount(interval_index(t, b), minlength=8), torch.full((8,), 8))
    # any rank's contiguous share (a multiple of k) is stratified too
    for rank_rows in t.split(16):
        assert torch.equal(torch.bincount(interval_index(rank_rows, b), minlength=8), torch.full((8,), 2))
    with pytest.raises(ValueError, match="not divisible"):
        stratified_timesteps(60, b)


def test_stratified_sampling_is_uniform_within_intervals():
    b = torch.tensor([0, 10, 1000])
    t = stratified_timesteps(20000, b, torch.Generator().manual_seed(1))
    low = t[0::2]
    assert low.min() == 0 and low.max() == 9
    assert torch.bincount(low, minlength=10).float().std() / 1000 < 0.1  # ~1000 each


def test_interval_means():
    loss = torch.tensor([1.0, 3.0, 5.0, 7.0])
    means, counts = interval_means(loss, torch.tensor([0, 0, 2, 2]), 3)
    assert means[0] == 2.0 and means[2] == 6.0 and torch.isnan(means[1])
    assert counts.tolist() == [2, 0, 2]


def test_uncertainty_weighted_loss_value_and_gradient():
    raw = torch.tensor([0.8, 0.4, 2.0, 0.1])  # interval means
    s = torch.tensor([0.0, 0.5, -1.0, 2.0], requires_grad=True)
    total = uncertainty_weighted_loss(raw, s)
    L = raw / 4
    expected = sum(0.5 * (np.exp(-si) * Li + si) for si, Li in zip(s.tolist(), L.tolist()))
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    torch.testing.assert_close(s.grad, 0.5 * (1 - torch.exp(-s.detach()) * L))


def test_uncertainty_weighting_module_starts_at_zero():
    uw = UncertaintyWeighting(8)
    assert torch.equal(uw.log_vars.detach(), torch.zeros(8))
    assert uw(torch.ones(8)).item() == pytest.approx(0.5)  # sum 0.5 * (1/8) over 8 intervals
