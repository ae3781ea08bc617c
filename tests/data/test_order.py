import numpy as np
import pytest

from dtr_scale.data.order import BatchOrder, epoch_permutation


def order(rank=0, world=1, n=100, batch=24, seed=0):
    return BatchOrder(num_samples=n, global_batch_size=batch, rank=rank, world_size=world, seed=seed)


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_ranks_take_disjoint_contiguous_slices_of_the_same_global_batch(world):
    for step in (0, 3, 4, 11):
        parts = [order(r, world).rank_positions(step) for r in range(world)]
        assert all(len(p) == 24 // world for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), order().global_positions(step))


def test_an_epoch_visits_distinct_samples_and_drops_the_tail():
    o = order()
    assert o.steps_per_epoch == 4  # 100 // 24; 4 samples are left out of each epoch
    epoch0 = np.concatenate([o.global_positions(s) for s in range(4)])
    assert len(np.unique(epoch0)) == 96
    epoch1 = np.concatenate([o.global_positions(s) for s in range(4, 8)])
    assert len(np.unique(epoch1)) == 96 and not np.array_equal(epoch0, epoch1)
    assert o.epoch(3) == 0 and o.epoch(4) == 1


def test_the_order_is_a_function_of_seed_and_epoch_only():
    np.testing.assert_array_equal(epoch_permutation(5, 2, 100), np.random.default_rng([5, 2]).permutation(100))
    np.testing.assert_array_equal(order(seed=1).global_positions(6), order(seed=1).global_positions(6))
    assert not np.array_equal(order(seed=1).global_positions(6), order(seed=2).global_positions(6))
    assert not epoch_permutation(0, 0, 100).flags.writeable  # cached arrays cannot be changed by callers


def test_bad_splits_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="not divisible by world_size 5"):
        order(world=5)
    with pytest.raises(ValueError, match="outside world_size"):
        order(rank=2, world=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        order(n=10)
