"""The calibration table: honest sources, estimates that follow their stated derivation,
measured entries winning, and which GPU a cluster config means."""

import dataclasses

import pytest

from plan_helpers import gpu_run

from dtr_scale.config import ClusterConfig, ConfigError, ModelConfig
from dtr_scale.plan.calibration import (
    choose_gpu,
    estimated_images_per_s,
    load_calibration,
    measure_images_per_s,
    mfu_key,
    model_key,
    training_throughput,
)
from dtr_scale.models.cost import model_flops_utilization
from dtr_scale.plan.model_cost import dit_shape, forward_macs

CAL = load_calibration()


def test_every_throughput_says_whether_it_was_measured_or_estimated():
    for entry in CAL.entries:
        assert entry["source"].startswith(("measured on", "estimated from")), entry
        assert entry["gpu"] in CAL.gpus


def test_estimated_entries_follow_from_flops_and_the_assumed_mfu():
    for entry in (e for e in CAL.entries if e["source"].startswith("estimated")):
        macs = forward_macs(dit_shape(ModelConfig(name=entry["model"])))
        peak = CAL.gpus[entry["gpu"]].peak_tflops[entry["precision"]]
        mfu = CAL.assumed_mfu[mfu_key(entry["precision"], entry["compile"])]
        assert entry["images_per_s"] == pytest.approx(estimated_images_per_s(macs, peak, mfu), rel=0.01), entry


def test_images_per_s_from_flops_by_hand():
    # 30% of 989 TFLOPS over 3 forwards of 2 x 80.7 GMACs
    assert estimated_images_per_s(80_700_000_000, 989, 0.30) == pytest.approx(0.3 * 989e12 / (6 * 80.7e9))


def test_an_entry_wins_and_anything_else_is_estimated_or_unknown():
    macs = forward_macs(dit_shape(ModelConfig(name="DiT-XL/2")))
    listed = training_throughput(CAL, "h100", "DiT-XL/2", "bf16", True, macs)
    assert listed.source.startswith("calibration.yaml: estimated from 118.6 GMACs")
    derived = training_throughput(CAL, "a100_40gb", "DiT-XL/2", "tf32", False, macs)
    assert derived.images_per_s == pytest.approx(estimated_images_per_s(macs, 156, CAL.assumed_mfu["tf32"]))
    assert derived.source.startswith("estimated, not measured")
    unknown = training_throughput(CAL, "cpu", "DiT-XL/2", "fp32", False, macs)
    assert unknown.images_per_s is None and "measure_images_per_s" in unknown.source


def test_model_key_names_a_preset_or_its_changes():
    assert model_key(ModelConfig(name="DiT-L/2")) == "DiT-L/2"
    tiny = ModelConfig(name="DiT-S/2", input_size=8, num_classes=10, depth=4, hidden_size=128, num_heads=4)
    assert model_key(tiny) == "DiT-S/2[input_size=8,depth=4,hidden_size=128,num_heads=4]"


@pytest.mark.parametrize("constraint,expected", [
    ("h100", "h100"),
    ("a100|h100", "a100_40gb"),  # a job may land on either: plan for the slower, smaller one
    ("A100-80GB&ib", "a100_80gb"),
])
def test_gpu_type_from_the_cluster_constraint(constraint, expected):
    cluster = ClusterConfig(kind="slurm", nodes=1, gpus_per_node=8, constraint=constraint)
    assert choose_gpu(gpu_run(cluster=cluster), CAL)[0] == expected


def test_gpu_type_asked_for_assumed_or_cpu():
    assert choose_gpu(gpu_run(), CAL, "h200") == ("h200", "as asked")
    gpu, why = choose_gpu(gpu_run(), CAL)
    assert gpu == "h100" and why.startswith("ASSUMED")
    assert choose_gpu(gpu_run(device="cpu"), CAL)[0] == "cpu"
    with pytest.raises(ConfigError, match=r"--gpu: 'v100' is not a GPU type in calibration.yaml"):
        choose_gpu(gpu_run(), CAL, "v100")


def test_measuring_throughput_runs_training_steps():
    cfg = gpu_run(ModelConfig(name="DiT-S/2", input_size=8, num_classes=10, depth=1, hidden_size=32, num_heads=2),
                   world_size=1, global_batch_size=8, precision="fp32", device="cpu")
    assert measure_images_per_s(cfg, steps=2, warmup=1) > 0


def test_mfu_is_the_inverse_of_the_estimate():
    macs = forward_macs(dit_shape(ModelConfig(name="DiT-XL/2")))
    assert model_flops_utilization(estimated_images_per_s(macs, 989, 0.45), macs, 989) == pytest.approx(0.45)
    # 620 images/s of DiT-XL/2 (118.6 GMACs) on an H100: 620 x 6 x 118.6e9 / 989e12
    assert model_flops_utilization(620, 118_600_000_000, 989) == pytest.approx(620 * 6 * 118.6e9 / 989e12)


def test_a_measured_entry_wins_over_an_estimated_one_and_is_named():
    macs = forward_macs(dit_shape(ModelConfig(name="DiT-XL/2")))
    estimate = next(e for e in CAL.entries if (e["gpu"], e["model"]) == ("h100", "DiT-XL/2"))
    measured = {**estimate, "images_per_s": 655.0,
                "source": "measured on NVIDIA H100 80GB HBM3, 2026-12-01: dtr-bench gpu, commit abc"}
    for entries in ([measured, *CAL.entries], [*CAL.entries, measured]):
        cal = dataclasses.replace(CAL, entries=entries)
        found = training_throughput(cal, "h100", "DiT-XL/2", "bf16", True, macs)
        index = entries.index(measured) + 1
        assert found.images_per_s == 655.0
        assert found.source == (f"calibration.yaml: {measured['source']} "
                                f"(throughput entry {index} of {len(entries)})")
