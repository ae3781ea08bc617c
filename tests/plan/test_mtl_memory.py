"""`dtr-scale plan` counts the k per-interval gradients that ANT-Nash and PCGrad hold, and refuses
a run where they do not fit."""

import pytest

from plan_helpers import compose_experiment, gpu_run

from dtr_scale.config import ConfigError, WeightingConfig
from dtr_scale.plan import make_plan
from dtr_scale.plan.model_cost import count_parameters

GIB = 2**30


def interval_gradients(plan) -> float:
    return sum(v for k, v in plan.memory.parts.items() if "interval gradients" in k)


@pytest.mark.parametrize("kind", ["ant_nash", "pcgrad"])
def test_dit_l2_holds_eight_fp32_gradient_copies_sharded_only_by_fsdp(kind):
    weighting = WeightingConfig(kind=kind, num_intervals=8)
    ddp = gpu_run("DiT-L/2", "ddp", weighting=weighting)
    p = count_parameters(ddp).total  # 457.8M
    assert interval_gradients(make_plan(ddp, gpu="h100")) == 8 * 4 * p  # 13.6 GiB per GPU
    assert 8 * 4 * p / GIB == pytest.approx(13.64, abs=0.01)
    fsdp = make_plan(gpu_run("DiT-L/2", "fsdp", weighting=weighting), gpu="h100")
    assert interval_gradients(fsdp) == 8 * 4 * p / 8  # each of the 8 ranks holds its shards
    uniform = make_plan(gpu_run("DiT-L/2", "ddp"), gpu="h100")
    assert interval_gradients(uniform) == 0
    assert make_plan(ddp, gpu="h100").memory.total == pytest.approx(uniform.memory.total + 8 * 4 * p)


def test_a_plan_the_gradient_copies_push_past_the_gpu_is_refused():
    # DiT-XL/2 at 32 per GPU fits a 40 GB A100 with DDP; ANT-Nash's 8 gradient copies (20.1 GiB) do not
    make_plan(gpu_run("DiT-XL/2", "ddp"), gpu="a100_40gb")
    nash = gpu_run("DiT-XL/2", "ddp", weighting=WeightingConfig(kind="ant_nash", num_intervals=8))
    with pytest.raises(ConfigError, match=r"DiT-XL/2 with backend ddp at per-GPU batch 32 needs about 5\d\.\d GiB"):
        make_plan(nash, gpu="a100_40gb")
    make_plan(gpu_run("DiT-XL/2", "fsdp", weighting=nash.weighting), gpu="a100_40gb")  # sharded: fits


@pytest.mark.parametrize("name", ["dtr_paper/400k/dit_l2_ant_nash_dtr", "dtr_paper/400k/dit_xl2_pcgrad"])
def test_the_presets_plan_on_80gb_gpus(name):
    cfg = compose_experiment(name, "cluster=example_cluster")
    assert cfg.weighting.nash_update_every == 25 and cfg.weighting.stratify and cfg.micro_batch_size % 8 == 0
    plan = make_plan(cfg, gpu="a100_80gb")
    assert interval_gradients(plan) == 8 * 4 * count_parameters(cfg).total
