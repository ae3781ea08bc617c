"""`dtr-bench scale`, run as a user runs it (the console command) at a tiny fraction: the report's counts,
bytes and keys hold together, whatever the speed of the machine."""

import json
import math
import os
import shutil
import subprocess
import sys

from dtr_scale.data.shard_format import read_manifest
from dtr_scale.plan.storage import IMAGENET_TRAIN_IMAGES

FRACTION, SHARD_SIZE, BATCH = 0.0003, 128, 32
STEPS = 24  # 768 samples a run: tens of ms of loader CPU, several of the CPU clock's 10 ms ticks


def dtr_bench() -> str:
    return shutil.which("dtr-bench", path=os.path.dirname(sys.executable)) or "dtr-bench"


def test_scale_benchmark_reports_imagenet_shaped_data_and_consistent_figures(tmp_path):
    out = tmp_path / "scale"
    done = subprocess.run([dtr_bench(), "scale", "--fraction", str(FRACTION), "--out", str(out), "--shard-size",
                           str(SHARD_SIZE), "--batch", str(BATCH), "--steps", str(STEPS), "--world-sizes", "1,2",
                           "--model", "DiT-S/8"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "scale_report.json").read_text())
    assert f"report: {out / 'scale_report.json'}" in done.stdout

    images = round(IMAGENET_TRAIN_IMAGES * FRACTION)  # 384
    prep, manifest = report["prep"], read_manifest(str(out / "data"))
    assert prep["images"] == prep["samples"] == manifest["num_samples"] == images
    assert prep["classes"] == manifest["num_classes"] == 1000 and sum(manifest["count_per_class"]) == images
    assert prep["stored_shape"] == manifest["stored_shape"] == [2, 8, 32, 32] and prep["dtype"] == "float16"
    assert manifest["latent_shape"] == [4, 32, 32]
    assert prep["shards"] == len(manifest["shards"]) == math.ceil(images / SHARD_SIZE)
    # The planner counts the moments (2 views x 8 channels x 32 x 32 fp16 = 32 KiB a sample); disk adds
    # MDS framing, the label/index/source columns, indexes and the per-sample hashes: under 2 %.
    assert prep["planner_estimate_bytes"] == images * 32768
    assert 1.0 < prep["on_disk_over_estimate"] < 1.02

    loader = report["loader"]
    assert set(loader["by_world"]) == {"1", "2"}
    for world, row in [*loader["by_world"].items(), ("1, evicted", loader["evicted_world_1"])]:
        assert row["samples_per_s_total"] > 0 and row["cpu_us_per_sample"] > 0
        assert math.isclose(row["samples_per_s_per_worker"] * 2, row["samples_per_s_per_process"])
        # A warm start reads its batches' bytes and little else: no shard is hashed again.
        assert 0.5 < row["bytes_read_over_bytes_used"] < 1.15, (world, row)
    assert "loader    world 1, from disk (pages evicted): " in done.stdout
    startup = report["startup"]
    assert 0 < startup["requeue_s"] and 0 < startup["cold_s"]

    requeue = report["requeue"]
    assert requeue["model"] == "DiT-S/8" and requeue["params"] == 33_142_016  # the DiT paper's 33M
    # model + AdamW's two moments, fp32, and DCP's metadata
    assert 3 * 4 * requeue["params"] < requeue["checkpoint_bytes"] < 3 * 4 * requeue["params"] * 1.05
    assert requeue["peak_rss_bytes"] > 3 * 4 * requeue["params"]
    assert all(requeue[k] > 0 for k in ("save_s", "load_s", "first_step_after_load_s", "read_bytes_s",
                                        "first_step_over_step_before_save"))


def test_scale_benchmark_refuses_a_directory_it_did_not_write(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    done = subprocess.run([dtr_bench(), "scale", "--fraction", "0.0001", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr  # a usage error, as for every command (command_line's exit statuses)
    assert done.stderr == (f"dtr-bench scale: config error: --out {tmp_path} is not empty and holds no "
                           "scale_report.json of an earlier run; give a new or empty directory (the benchmark writes "
                           "gigabytes there and replaces its own files)\n")
    assert (tmp_path / "precious.txt").read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["precious.txt"]


def test_scale_benchmark_usage_errors_exit_2_naming_the_option(tmp_path):
    for args, error in ((["--fraction", "2"], "--fraction must be in (0, 1], got 2.0"),
                        (["--world-sizes", "1,x"], "argument --world-sizes: expected positive integers separated by "
                                                   "commas (1,2,8), got '1,x'"),
                        (["--bogus"], "unrecognized arguments: --bogus")):
        done = subprocess.run([dtr_bench(), "scale", "--out", str(tmp_path / "out"), *args], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.startswith("usage: dtr-bench scale ") and f"dtr-bench scale: error: {error}\n" in done.stderr
        assert not (tmp_path / "out").exists()


def test_a_run_too_short_for_the_cpu_clock_prints_no_per_core_rate():
    from dtr_scale.benchmarks.bench_scale import per_core

    assert per_core({"cpu_us_per_sample": 125.0}) == "8,000"
    assert per_core({"cpu_us_per_sample": 0.0}) == "-"  # 10 ms ticks: a few dozen samples may measure none
