"""The synthetic loader reads the in-memory latents in the one data order (BatchOrder) and resumes from its position."""

import pytest
import torch

from dtr_scale.data.order import BatchOrder
from dtr_scale.data.synthetic import SyntheticLatents, SyntheticLoader

DATA = SyntheticLatents(40, 4, (2, 4, 4), 0.3, seed=3)


def loader(rank=0, world=1, batch=8, seed=5):
    return SyntheticLoader(DATA, global_batch_size=batch, rank=rank, world_size=world, seed=seed)


def test_batches_are_the_batch_order_positions_across_epochs():
    it, order = loader(rank=1, world=2), BatchOrder(40, 8, 1, 2, 5)
    for step in range(12):  # 5 steps per epoch: crosses two epoch boundaries
        latents, labels = next(it)
        idx = torch.tensor(order.rank_positions(step))
        assert torch.equal(latents, DATA.latents[idx]) and torch.equal(labels, DATA.labels[idx])


def test_ranks_together_read_the_single_process_batch():
    whole, halves = loader(), [loader(rank=r, world=2) for r in range(2)]
    for _ in range(7):
        latents, labels = next(whole)
        parts = [next(h) for h in halves]
        assert torch.equal(latents, torch.cat([p[0] for p in parts]))
        assert torch.equal(labels, torch.cat([p[1] for p in parts]))


def test_position_state_resumes_the_same_stream_on_another_world_size():
    straight = loader()
    for _ in range(6):
        next(straight)
    assert straight.state_dict() == {"position": 6 * 8}
    resumed = [loader(rank=r, world=2) for r in range(2)]
    for r in resumed:
        r.load_state_dict(straight.state_dict())
    latents, _ = next(straight)
    assert torch.equal(latents, torch.cat([next(r)[0] for r in resumed]))


def test_a_position_inside_a_global_batch_is_refused():
    with pytest.raises(ValueError, match="not a whole number of global batches of 8"):
        loader().load_state_dict({"position": 12})
