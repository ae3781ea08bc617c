"""One training step, `train_step`, shared by the loop, the benchmarks and the planner: each of
them runs it once per step it trains or times, and between log steps the loop never reads a
device value on the host."""

import json
import sys
from pathlib import Path

import pytest
import torch

from dtr_scale.benchmarks import bench_gpu, bench_overhead
from dtr_scale.plan.calibration import measure_images_per_s
from dtr_scale.train import loop
from dtr_scale.train.metrics import read_metrics

DTR_BENCH = str(Path(sys.executable).parent / "dtr-bench")


@pytest.fixture
def steps_run(monkeypatch):
    """The step index of every train_step call, through a wrapper around the real step."""
    real, seen = loop.train_step, []

    def counting(parts, batch, draws):
        seen.append(draws.step)
        return real(parts, batch, draws)

    monkeypatch.setattr(loop, "train_step", counting)
    return seen


def test_the_loop_trains_each_step_with_train_step(tiny_config, steps_run):
    loop.train(tiny_config(steps=7, **{"checkpoint.every": 5}))
    assert steps_run == list(range(7))


def test_a_resumed_loop_continues_with_the_next_step(tiny_config, steps_run):
    cfg = tiny_config(steps=7, **{"checkpoint.every": 1000})
    calls = {"n": 0}

    def stop_after_three():
        calls["n"] += 1
        return calls["n"] > 3

    assert loop.train(cfg, stop_requested=stop_after_three).step == 3
    loop.train(cfg)
    assert steps_run == [0, 1, 2, 3, 4, 5, 6]


def test_the_planners_calibration_times_train_step(tiny_config, steps_run):
    cfg = tiny_config(global_batch_size=8, world_size=1)
    assert measure_images_per_s(cfg, steps=3, warmup=2) > 0
    assert steps_run == [0, 1, 2, 3, 4]  # 2 warm-up steps, then the 3 timed ones


def test_dtr_bench_gpu_times_train_step(tmp_path, steps_run):
    cfg = bench_gpu.bench_config(bench_gpu.SMOKE_SPEC, tmp_path, "DiT-S/2", 8, compile=False, precision="fp32")
    timed = bench_gpu.time_training(cfg, bench_gpu.SMOKE_SPEC, steps=3, warmup=1, compile=False)
    assert steps_run == [0, 1, 2, 3]
    assert len(timed["losses"]) == 4 and timed["images_per_s"] > 0


def test_dtr_bench_overhead_pairs_each_loop_step_with_a_bare_step(tmp_path, steps_run, monkeypatch):
    bare_steps = []
    real_bare = bench_overhead.bare_step

    def counting_bare(cfg):
        step = real_bare(cfg)

        def counted():
            bare_steps.append(len(steps_run))
            step()

        return counted

    monkeypatch.setattr(bench_overhead, "bare_step", counting_bare)
    args = bench_overhead.main.__globals__["argparse"].Namespace(
        rounds=1, steps=4, warmup=1, batch=8, depth=1, hidden_size=32, heads=4, input_size=8, workdir=str(tmp_path))
    loop_ms, bare_ms = bench_overhead.paired_step_ms(bench_overhead.bench_config(args, tmp_path / "run"), 1)
    assert steps_run == list(range(6))  # warmup + steps + 1: the last step closes the last timed interval
    assert bare_steps == list(range(6))  # one bare step right before each loop step
    assert loop_ms > 0 and bare_ms > 0


def test_dtr_bench_overhead_reports_median_spread_and_target(tmp_path):
    import subprocess

    out = tmp_path / "overhead.json"
    done = subprocess.run([DTR_BENCH, "overhead", "--rounds", "3", "--steps", "4", "--warmup", "1", "--batch", "8",
                           "--depth", "1", "--hidden-size", "32", "--heads", "4", "--input-size", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["overhead_ms"] == pytest.approx([a - b for a, b in zip(r["loop_step_ms"], r["bare_step_ms"])])
    assert sorted(r["overhead_ms"])[1] == pytest.approx(r["median_overhead_ms"])
    assert r["spread_overhead_ms"] == [min(r["overhead_ms"]), max(r["overhead_ms"])]
    assert r["median_overhead_percent"] == pytest.approx(100 * r["median_overhead_ms"] / r["median_bare_step_ms"])
    assert r["target_ms"] == max(2.0, 0.03 * r["median_bare_step_ms"])
    assert "overhead per step: median" in done.stdout


# --- no host synchronisation between log steps ------------------------------------------------

HOST_READS = ("item", "cpu", "tolist", "__bool__", "__float__", "__int__")


@pytest.fixture
def host_reads(monkeypatch):
    """(loop step, caller) of every host read of a tensor made by dtr_scale's own code: item(),
    cpu(), tolist() and the conversions bool(), float(), int(). The loop step is the number of
    train_step calls so far."""
    reads, steps = [], {"n": 0}
    package = str(Path(loop.__file__).parents[1])
    real_step = loop.train_step

    def counting_step(parts, batch, draws):
        steps["n"] += 1
        return real_step(parts, batch, draws)

    def recording(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(package):
                reads.append((steps["n"], f"{Path(caller.co_filename).name}:{caller.co_name}:{name}"))
            return real(self, *args, **kwargs)

        return read

    monkeypatch.setattr(loop, "train_step", counting_step)
    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, recording(name))
    return reads


def test_the_loop_reads_nothing_from_the_device_between_log_steps(tiny_config, host_reads):
    # fused AdamW (the default) masks a non-finite step on the device (found_inf): no host sync at all
    cfg = tiny_config(steps=12, phema_stds=[0.05, 0.1], **{"logging.every": 6, "checkpoint.every": 1000})
    assert cfg.backend.fused_adamw  # the default
    loop.train(cfg)
    after_steps = sorted({n for n, _ in host_reads})
    # reads happen before the first step (setup: routing.png) and once 6 or 12 steps are done: the
    # log steps (and the last step's checkpoint), never while steps 1..5 or 7..11 are in flight
    assert set(after_steps) <= {0, 6, 12}, host_reads
    assert {what for n, what in host_reads if n == 6} >= {"loop.py:read_pending:tolist"}
    assert [r["step"] for r in read_metrics(cfg.run_dir)] == [6, 12]


def test_unfused_adamw_reads_only_the_step_mask_between_log_steps(tiny_config, host_reads):
    # torch's unfused AdamW cannot skip a step on the device: the mask is read, one bool per step
    cfg = tiny_config(steps=12, **{"logging.every": 6, "checkpoint.every": 1000, "backend.fused_adamw": False})
    loop.train(cfg)
    between = [(n, what) for n, what in host_reads if n not in (0, 6, 12)]  # 0: setup
    assert between == [(n, "torch_dist.py:step:__bool__") for n in range(1, 13) if n not in (6, 12)]
