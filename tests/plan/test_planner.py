"""The plan: time and SLURM jobs, the report's headline numbers, and ConfigErrors that name
the key for settings that cannot work together."""

import dataclasses
import math

import pytest

from plan_helpers import compose_experiment, gpu_run

from dtr_scale.config import ClusterConfig, ConfigError, DataConfig, ModelConfig, WeightingConfig
from dtr_scale.launch.executor import requeue_budget
from dtr_scale.plan import format_plan, make_plan, plan_main
from dtr_scale.plan.calibration import load_calibration, model_key

TINY = ModelConfig(name="DiT-S/2", input_size=8, num_classes=10, depth=1, hidden_size=32, num_heads=2)


def test_jobs_and_requeues_by_hand():
    # One process at a calibrated 8 images/s and batch 8: 1 s per step; 10,000 steps = 10,000 s.
    # A 60-minute job less the 60 s signal delay trains 3,540 s: 3 jobs, 2 time-limit requeues.
    cal = load_calibration()
    entry = {"gpu": "h100", "model": model_key(TINY), "precision": "bf16", "compile": False, "images_per_s": 8.0,
             "source": "measured on a test"}
    cal = dataclasses.replace(cal, entries=[entry])
    cluster = ClusterConfig(kind="slurm", nodes=1, gpus_per_node=1, time_min=60, signal_delay_s=60, step_seconds=1.0)
    cfg = gpu_run(TINY, world_size=1, global_batch_size=8, steps=10_000, cluster=cluster,
                   checkpoint=dataclasses.replace(gpu_run().checkpoint, every=1_000),
                   eval=dataclasses.replace(gpu_run().eval, every=5_000))
    plan = make_plan(cfg, gpu="h100", calibration=cal)
    assert plan.step.seconds == pytest.approx(1.0)
    assert plan.wall_seconds == pytest.approx(10_000)
    assert (plan.jobs.jobs, plan.jobs.needed_requeues) == (math.ceil(10_000 / 3_540), 2) == (3, 2)
    assert plan.jobs.configured_requeues == requeue_budget(10_000, 1.0, 60, 60) == 9  # sized by the executor
    assert plan.training_gpu_hours == pytest.approx(10_000 / 3600)


def test_ddp_across_nodes_waits_on_the_gradient_all_reduce():
    cluster = ClusterConfig(kind="slurm", nodes=4, gpus_per_node=8)
    plan = make_plan(gpu_run("DiT-L/2", world_size=32, cluster=cluster), gpu="h100")
    grads = 4 * plan.params.total
    assert plan.step.communication_s == pytest.approx(2 * 31 / 32 * grads / 40e9)  # ring all-reduce at 40 GB/s
    assert any(w.startswith("communication-bound") for w in plan.warnings)
    one_node = make_plan(gpu_run("DiT-L/2", world_size=8), gpu="h100")
    assert one_node.training_gpu_hours < plan.training_gpu_hours


@pytest.fixture(scope="module")
def headline():
    cfg = compose_experiment("dtr_paper/dit_l2_dtr_antuw_2m", "cluster=example_cluster")
    return cfg, make_plan(cfg)


def test_plan_text_carries_the_headline_numbers(headline):
    cfg, plan = headline
    text = format_plan(plan, cfg)
    for expected in [
        "DiT-L/2 on 8 x h100", "DTR, beta 0.8, alpha 4", "ANT-UW", "8 uniform intervals, stratified",
        "2,000,000 steps x global batch 256", "EMA 0.9999", "250 steps, CFG 1.5",
        "457,840,672 (457.8M", "80.70 GMACs per image",  # SPEC 1: 458M parameters, 80.7 Gflops
        f"{plan.throughput.images_per_s:,.0f} training", "estimated",
        f"{plan.training_gpu_hours:,.0f} training", f"{plan.jobs.jobs} jobs of 1440 min",
        "max_requeues      23 allowed",
        "41.98 GB", "7 kept", "40 snapshots",
        "50,000 samples x 250 steps x 2 (CFG)", "10,000 samples x 250 steps x 2 (CFG)", "2 x ", "40 x ",
        "GPU type assumed",
    ]:
        assert expected in text, expected


def test_the_headline_run_measures_at_a_fraction_of_the_cost_with_its_final_fid_50k_unchanged(headline):
    cfg, plan = headline
    full, quick = plan.evaluation
    assert (full.protocol, full.num_samples, full.steps) == ("full", 50_000, [400_000, 2_000_000])
    assert (quick.protocol, quick.num_samples, quick.steps) == ("quick", 10_000, list(range(50_000, 2_000_001, 50_000)))
    assert full.gpu_hours + quick.gpu_hours <= 40
    # what evaluating every 50K with the full protocol costs: 40 points of 50K samples
    every_point = make_plan(dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, milestones=None, quick=type(
        cfg.eval.quick)(every=0))))
    (alone,) = every_point.evaluation
    assert alone.points == 40 and alone.gpu_hours == pytest.approx(full.gpu_hours_per_point * 40)
    assert alone.gpu_hours > 3.5 * (full.gpu_hours + quick.gpu_hours)
    assert "full protocol at 400,000, the last step: 50,000 samples" in format_plan(plan, cfg)


def test_snr_intervals_print_ants_cost_beside_the_exact_optimum_of_the_papers_objective():
    cfg = compose_experiment("dtr_paper/dit_l2_dtr_antuw_2m", "cluster=example_cluster", "weighting.intervals=snr_dp")
    plan = make_plan(cfg)
    # each partition under the paper's objective (and ANT's code's centre): SPEC 4's linear schedule, k = 8
    assert [(c.kind, c.bounds[:5], round(c.cost, 2), round(c.code_cost, 2)) for c in plan.intervals] == [
        ("snr_dp", (0, 2, 3, 6, 11), 9092.6, 9092.6), ("snr_optimal", (0, 1, 2, 3, 6), 4250.97, 6037.93)]
    text = format_plan(plan, cfg)
    assert ("ANT's programme (snr_dp)     cost 9,092.60 (ANT's code's centre: 9,092.60), starts "
            "[0, 2, 3, 6, 11, 19, 38, 95]  <- used") in text
    assert ("exact optimum (snr_optimal)  cost 4,250.97 (ANT's code's centre: 6,037.93), starts "
            "[0, 1, 2, 3, 6, 11, 24, 63]") in text
    uniform = compose_experiment("dtr_paper/dit_l2_dtr_antuw_2m", "cluster=example_cluster")
    assert make_plan(uniform).intervals == [] and "SNR timestep intervals" not in format_plan(make_plan(uniform), uniform)


def test_plan_main_prints_the_plan_or_the_error(headline, capsys):
    cfg, _ = headline
    assert plan_main(cfg, gpu="a100_80gb") == 0
    assert "DiT-L/2 on 8 x a100_80gb" in capsys.readouterr().out
    bad = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, every=30_000))
    assert plan_main(bad) == 2
    assert "config error: eval.every: 30000 is not a multiple of checkpoint.every=50000" in capsys.readouterr().err


@pytest.mark.parametrize("changes,pattern", [
    ({"steps": 40_000}, r"eval\.every: the first evaluation \(step 50000\) comes after the last step \(40000\)"),
    ({"device": "cpu", "cluster": ClusterConfig(kind="slurm", gpus_per_node=8)}, r"device: cpu, but the cluster"),
    ({"cluster": ClusterConfig(kind="slurm", nodes=1, gpus_per_node=8, cpus_per_task=4)},
     r"cluster\.cpus_per_task: 4 CPUs cannot run .* data\.num_workers=8"),
])
def test_inconsistent_settings_fail_naming_the_key(changes, pattern):
    cfg = gpu_run(data=DataConfig(kind="shards", path="data/imagenet256", num_workers=8), **changes)
    with pytest.raises(ConfigError, match=pattern):
        make_plan(cfg)


def test_a_batch_the_intervals_do_not_divide_is_refused_even_after_editing():
    cfg = gpu_run("DiT-L/2", world_size=8, weighting=WeightingConfig(kind="ant_uw", num_intervals=8))
    cfg.world_size = 64  # 256 / 64 = 4 per GPU: not a multiple of the 8 intervals
    with pytest.raises(ConfigError, match=r"global_batch_size: per-rank batch 4 .* weighting\.num_intervals=8"):
        make_plan(cfg)


def test_unknown_throughput_still_plans_memory_and_storage():
    plan = make_plan(gpu_run("DiT-XL/2", world_size=1, global_batch_size=8, device="cpu", precision="fp32"))
    assert plan.throughput.images_per_s is None and plan.step is None
    assert [(ev.protocol, ev.gpu_hours_per_point) for ev in plan.evaluation] == [("full", None)]
    assert plan.checkpoint_bytes > 0
    assert "unknown" in format_plan(plan, gpu_run("DiT-XL/2", world_size=1, global_batch_size=8, device="cpu"))
