"""The DTR paper presets (configs/experiment/dtr_paper): every row of SPEC section 5's 400K
table for DiT-B/2, L/2 and XL/2, and the 2M headline run. Each composes through Hydra,
validates, and carries the paper's values; the expected values below are written from
SPEC, not read from the yaml."""

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dtr_scale.config import TrainConfig
from dtr_scale.configs import CONFIG_DIR

sys.path.insert(0, str(Path(__file__).parent / "plan"))  # --import-mode=importlib: share the plan tests' helper
from plan_helpers import compose_experiment  # noqa: E402

PRESET_DIR = Path(CONFIG_DIR) / "experiment"
SIZES = {"b2": "DiT-B/2", "l2": "DiT-L/2", "xl2": "DiT-XL/2"}
ROWS = {  # SPEC 5, 400K table: (routing kind, weighting kind)
    "vanilla": ("none", "uniform"),
    "dtr": ("dtr", "uniform"),
    "min_snr": ("none", "min_snr"),
    "min_snr_dtr": ("dtr", "min_snr"),
    "ant_uw": ("none", "ant_uw"),
    "ant_uw_dtr": ("dtr", "ant_uw"),
    "random_routing": ("random", "uniform"),  # R-TR
    "ant_nash": ("none", "ant_nash"),  # the MTL optimisation methods DTR composes with
    "ant_nash_dtr": ("dtr", "ant_nash"),
    "pcgrad": ("none", "pcgrad"),
    "pcgrad_dtr": ("dtr", "pcgrad"),
}
TABLE = {f"dtr_paper/400k/dit_{size}_{row}": (model, routing, weighting, 400_000)
         for size, model in SIZES.items() for row, (routing, weighting) in ROWS.items()}
HEADLINE = {"dtr_paper/dit_l2_dtr_antuw_2m": ("DiT-L/2", "dtr", "ant_uw", 2_000_000)}
PRESETS = {**TABLE, **HEADLINE}


@pytest.fixture(scope="module")
def presets() -> dict[str, TrainConfig]:
    return {name: compose_experiment(name) for name in PRESETS}


def test_the_presets_are_the_400k_table_for_three_sizes_and_the_headline_run():
    files = {str(p.relative_to(PRESET_DIR).with_suffix("")) for p in (PRESET_DIR / "dtr_paper").rglob("*.yaml")}
    assert files - {"dtr_paper/base"} == set(PRESETS)
    assert len(TABLE) == 33


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_its_row(presets, name):
    cfg = presets[name]
    model, routing, weighting, steps = PRESETS[name]
    assert (cfg.model.name, cfg.routing.kind, cfg.weighting.kind, cfg.steps) == (model, routing, weighting, steps)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_trains_with_the_papers_recipe(presets, name):
    cfg = presets[name]
    # SPEC 5: ImageNet 256 as sd-vae-ft-ema latents (4 x 32 x 32), 1000 classes, label dropout 0.1
    assert (cfg.data.kind, Path(cfg.data.path).name) == ("shards", "imagenet256")
    assert (cfg.model.input_size, cfg.model.in_channels, cfg.model.num_classes) == (32, 4, 1000)
    assert cfg.model.class_dropout_prob == 0.1 and cfg.model.learn_sigma
    # global batch 256, AdamW lr 1e-4, wd 0, constant lr, EMA 0.9999 every step
    assert cfg.global_batch_size == 256
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, tuple(cfg.optimizer.betas)) == (1e-4, 0.0, (0.9, 0.999))
    assert cfg.optimizer.grad_clip is None
    assert cfg.ema_decay == 0.9999
    assert tuple(cfg.phema_stds) == (0.05, 0.10)
    # SPEC 3: linear schedule, T = 1000, learned sigma
    assert (cfg.diffusion.schedule, cfg.diffusion.num_timesteps, cfg.diffusion.learn_sigma) == ("linear", 1000, True)
    assert cfg.checkpoint.every == 50_000


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_evaluates_like_the_paper(presets, name):
    cfg = presets[name]
    # SPEC 5/6: FID-50K (and the rest of ADM's suite), 250 DDPM steps, CFG 1.5 on all latent channels,
    # at 400K and the last step; between them FID-10K every 50K steps with the same sampler
    d, e = cfg.diffusion, cfg.eval
    assert (d.sampler, d.sampling_steps, d.cfg_scale, d.guided_channels) == ("ddpm", 250, 1.5, "all")
    assert (e.num_samples, e.milestones, e.pr_arithmetic) == (50_000, [400_000, -1], "adm")
    assert (e.quick.every, e.quick.num_samples) == (50_000, 10_000)
    assert e.due_protocols(400_000, cfg.steps) == ["full", "quick"]
    assert e.due_protocols(cfg.steps, cfg.steps) == ["full", "quick"]
    assert e.due_protocols(350_000, cfg.steps) == ["quick"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_routes_and_weights_with_the_papers_settings(presets, name):
    cfg = presets[name]
    r, w = cfg.routing, cfg.weighting
    if r.kind == "dtr":
        assert (r.beta, r.alpha) == (0.8, 4.0)  # SPEC 2 defaults
    if r.kind == "random":
        assert r.beta == 0.8  # R-TR activates as many channels as DTR
    if w.kind in ("ant_uw", "ant_nash", "pcgrad"):
        # SPEC 4: k = 8 uniform intervals, stratified timesteps
        assert (w.num_intervals, w.intervals, w.stratify) == (8, "uniform", True)
        assert cfg.micro_batch_size % 8 == 0
    else:
        assert not w.stratify  # the baselines sample t uniformly
    if w.kind == "ant_uw":  # UW log-variances at lr 0.025, wd 0
        assert (w.uw_lr, w.uw_weight_decay) == (0.025, 0.0)
    if w.kind == "ant_nash":  # Nash-MTL: solve every 25 steps, at most 20 convex iterations, clip at 1
        assert (w.nash_update_every, w.nash_max_iter, w.nash_max_grad_norm) == (25, 20, 1.0)
    if w.kind == "min_snr":
        assert (w.min_snr_gamma, cfg.diffusion.prediction) == (5.0, "eps")


def test_base_states_the_recipe_itself_not_through_train_yaml():
    # train.yaml's own values are a tiny CPU run (lr 1e-3, EMA 0.99, batch 64, 50 sampling steps, ...):
    # each of these must be written in the shared base so no preset inherits one by accident.
    base = OmegaConf.load(PRESET_DIR / "dtr_paper" / "base.yaml")
    keys = ["steps", "global_batch_size", "world_size", "device", "ema_decay", "phema_stds", "phema_every",
            "sample_at_end", "model.class_dropout_prob", "optimizer.lr", "optimizer.weight_decay",
            "diffusion.schedule", "diffusion.sampling_steps", "diffusion.cfg_scale", "checkpoint.every",
            "checkpoint.keep_last", "eval.every", "eval.num_samples", "eval.batch_size", "logging.every"]
    missing = [k for k in keys if OmegaConf.select(base, k, default="<absent>") == "<absent>"]
    assert missing == []


def test_headline_composes_with_the_example_cluster():
    cfg = compose_experiment("dtr_paper/dit_l2_dtr_antuw_2m", "cluster=example_cluster")
    assert cfg.cluster.world_size == cfg.world_size == 8
    assert cfg.micro_batch_size == 32  # four samples per ANT interval on each GPU
