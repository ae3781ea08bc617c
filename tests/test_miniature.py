"""The paper in miniature as a seed sweep: `dtr-scale train -m experiment=miniature/... seed=0,1,2`
launches one run per (configuration, seed), each in its own run directory, through Hydra's
multirun exactly as the command line does (the training itself is replaced by a recorder)."""

from __future__ import annotations

import sys

from hydra.core.global_hydra import GlobalHydra

from dtr_scale import run

CONFIGS = {"miniature/vanilla": ("none", "uniform"), "miniature/dtr": ("dtr", "uniform"),
           "miniature/dtr_antuw": ("dtr", "ant_uw")}


def test_the_seed_sweep_gives_each_configuration_and_seed_its_own_run(tmp_path, monkeypatch):
    launched = []
    monkeypatch.setattr(run, "run_training", lambda cfg: launched.append(
        (cfg.run_dir, cfg.seed, cfg.routing.kind, cfg.weighting.kind, cfg.steps)))
    monkeypatch.setattr(sys, "argv", ["dtr-scale train", "-m", f"experiment={','.join(CONFIGS)}", "seed=0,1,2",
                                      f"hydra.sweep.dir={tmp_path}"])
    try:
        run.main()
    finally:
        GlobalHydra.instance().clear()
    expected = {(routing, weighting, seed) for routing, weighting in CONFIGS.values() for seed in (0, 1, 2)}
    assert {(r, w, s) for _, s, r, w, _ in launched} == expected and len(launched) == 9
    assert sorted(run_dir for run_dir, *_ in launched) == sorted(str(tmp_path / str(job)) for job in range(9))
    assert {steps for *_, steps in launched} == {2000}  # the miniature's own length, not train.yaml's
