"""Each step's timesteps, noise and label dropout: drawn for the whole global batch from
(seed, step) on the training device, so a rank's rows do not depend on the world size."""

import torch

from dtr_scale.rng import STEP_DRAWS_STREAM, step_seed
from dtr_scale.train.components import build_objective
from dtr_scale.train.loop import draw_step


def test_ranks_take_rows_of_one_global_draw(tiny_config):
    cfg = tiny_config(global_batch_size=16)
    objective = build_objective(cfg)
    whole = draw_step(cfg, objective, 7, 0, 1)
    halves = [draw_step(cfg, objective, 7, rank, 2) for rank in (0, 1)]
    for name in ("t", "noise", "drop"):
        assert torch.equal(torch.cat([getattr(h, name) for h in halves]), getattr(whole, name)), name
    other_step = draw_step(cfg, objective, 8, 0, 1)
    assert not torch.equal(other_step.noise, whole.noise)


def test_cpu_draws_are_the_cpu_generator_seeded_by_seed_and_step(tiny_config):
    # the numbers CPU runs (and their tests) were made with: t, then noise, then the dropout mask,
    # from one CPU generator seeded by step_seed(seed, step, STEP_DRAWS_STREAM), stream 1
    cfg = tiny_config(global_batch_size=16, **{"weighting.kind": "uniform"})
    draws = draw_step(cfg, build_objective(cfg), 3, 0, 1, "cpu")
    g = torch.Generator().manual_seed(step_seed(cfg.seed, 3, STEP_DRAWS_STREAM))
    t = torch.randint(0, 1000, (16,), generator=g)
    noise = torch.randn(16, 4, 8, 8, generator=g)
    drop = (torch.rand(16, generator=g) < cfg.model.class_dropout_prob).long()
    assert torch.equal(draws.t, t) and torch.equal(draws.noise, noise) and torch.equal(draws.drop, drop)
    assert draws.t.device.type == draws.noise.device.type == "cpu"
