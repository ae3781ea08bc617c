"""`dtr-bench gpu --smoke`: every section of the one-shot GPU benchmark runs on the CPU with a
tiny DiT, through the console script, with only the packages a bare GPU image has (plus the
carried config wheels), and writes a report and calibration entries the planner then uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dtr_scale.plan.calibration import CALIBRATION_FILE, load_calibration, training_throughput
from dtr_scale.models.cost import dit_shape, forward_macs

DTR_BENCH = str(Path(sys.executable).parent / "dtr-bench")
# what a stock PyTorch GPU image lacks (it has torch, numpy, safetensors, tqdm, PyYAML, Pillow; the
# config wheels omegaconf, hydra-core and antlr4 travel with the checkout): none of it may be imported
ABSENT = ("wandb", "deepspeed", "streaming", "submitit", "cvxpy", "ecos", "webdataset", "diffusers", "torch_fidelity")
BLOCKER = f"""
import sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            raise ImportError(f"{{name}} is not on the GPU image")
sys.meta_path.insert(0, Absent())
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    site = out.parent / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(out.parent)}
    done = subprocess.run([DTR_BENCH, "gpu", "--smoke", "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "gpu_report.json").read_text()), yaml.safe_load((out / "calibration_entries.yaml").read_text())


def test_every_section_ran_and_only_the_cuda_parts_are_skipped(smoke):
    report, _ = smoke
    assert report["meta"]["smoke"] is True and report["meta"]["device"] == "cpu"
    assert report["errors"] == {}
    assert list(report["skipped"]) == ["correctness.no_host_sync"] and "CUDA" in report["skipped"]["correctness.no_host_sync"]
    for section in ("correctness", "throughput", "checkpoint", "sampling", "activation_checkpointing", "parallel"):
        assert section in report, section


def test_the_correctness_checks_pass_on_the_cpu(smoke):
    checks = smoke[0]["correctness"]
    bf16 = checks["bf16_vs_fp32"]
    assert bf16["ok"] and len(bf16["bf16"]) == 3 and bf16["bf16"] != bf16["fp32"]  # bf16 really ran in bf16
    assert bf16["max_relative_difference"] <= bf16["tolerance"]
    compiled = checks["compile_vs_eager"]
    assert compiled["equal"] and len(compiled["eager"]) == 5 and compiled["compile_backend"] == "aot_eager"
    assert compiled["eager"][4] < compiled["eager"][0]  # five real training steps
    resume = checks["resume"]
    assert resume["equal"] and resume["losses_equal"] and resume["weights_equal"] and resume["stopped_at"] == 2


def test_the_figures_are_consistent(smoke):
    report, _ = smoke
    (row,) = report["throughput"]
    assert row["batch"] == 16 and row["images_per_s"] > 0 and row["mfu"] is None  # no GPU peak on a CPU
    assert row["images_per_s"] == pytest.approx(row["batch"] / (row["step_ms"] / 1e3))
    assert row["dtr_overhead"] == pytest.approx(row["step_ms"] / row["routing_none"]["step_ms"] - 1)
    ckpt = report["checkpoint"]
    assert ckpt["bytes"] > 0 and 0 < ckpt["async_blocked_s"] <= ckpt["async_total_s"]
    assert ckpt["async_vs_sync_blocked"] == pytest.approx(ckpt["async_blocked_s"] / ckpt["sync_blocked_s"])
    sampling = report["sampling"]
    assert sampling["sampler"] == "ddpm-250" and sampling["images_per_s"] > 0
    assert sampling["eval_50k_hours"] == pytest.approx(50_000 / sampling["images_per_s"] / 3600)
    for section, pair in (("parallel", ("ddp", "fsdp")), ("activation_checkpointing", ("off", "on"))):
        assert all(report[section][name]["step_ms"] > 0 for name in pair), section


def test_the_calibration_entries_are_measured_and_the_planner_prefers_them(smoke, tmp_path):
    report, entries = smoke
    (entry,) = entries
    assert entry["source"].startswith("measured on cpu, ") and "commit" in entry["source"]
    assert entry["images_per_s"] == pytest.approx(report["throughput"][0]["images_per_s"], abs=0.05)
    assert entry["measured"]["torch"] == report["meta"]["torch"]
    table = yaml.safe_load(CALIBRATION_FILE.read_text())
    table["throughput"].append(entry)
    path = tmp_path / "calibration.yaml"
    path.write_text(yaml.safe_dump(table))
    cal = load_calibration(path)
    from dtr_scale.config import ModelConfig

    macs = forward_macs(dit_shape(ModelConfig(name="DiT-S/2", input_size=8, num_classes=10, depth=2,
                                              hidden_size=64, num_heads=4)))
    found = training_throughput(cal, "cpu", entry["model"], "bf16", True, macs)
    assert found.images_per_s == entry["images_per_s"]
    assert found.source.startswith(f"calibration.yaml: {entry['source']} (throughput entry {len(cal.entries)} of")
