"""The real trainer as a submitit job: 2 gloo tasks of a tiny DiT with DTR + ANT-UW,
preempted once (local executor) and twice (SLURM), reaching the uninterrupted job's
weights bit for bit without training any step twice; and on SLURM, through a real
--time limit too; and `dtr-scale train` following its SLURM job through a preemption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtr_scale.config import TrainConfig, to_train_config
from dtr_scale.eval.sample import load_model
from dtr_scale.config import ClusterConfig
from dtr_scale.launch.ledger import read_status
from dtr_scale.launch.submit import submit_training
from dtr_scale.train.checkpoint import latest_checkpoint
from dtr_scale.train.metrics import read_metrics
from launch_helpers import (ledger_states, local_task_pids, preempt_paused, results_within, sacct_states,
                            wait_until)


def tiny_run(run_dir, steps: int, *, depth: int = 2, hidden_size: int = 64, batch: int = 16) -> TrainConfig:
    return to_train_config({
        "model": {"name": "DiT-S/2", "input_size": 8, "in_channels": 4, "num_classes": 4,
                  "depth": depth, "hidden_size": hidden_size, "num_heads": 4},
        "routing": {"kind": "dtr"}, "weighting": {"kind": "ant_uw", "num_intervals": 4},
        "optimizer": {"lr": 1e-3}, "data": {"kind": "synthetic", "num_samples": 256},
        "run_dir": str(run_dir), "steps": steps, "global_batch_size": batch, "world_size": 2, "ema_decay": 0.9,
        "sample_at_end": 0, "checkpoint": {"every": 10_000},  # only stops and the end write one
        "logging": {"every": 1, "wandb": "disabled"},  # one metrics line per step trained
    })


def trained_steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir)]


def final_weights(run_dir) -> dict[str, dict[str, torch.Tensor]]:
    ckpt = latest_checkpoint(run_dir)
    return {name: load_model(ckpt, use_ema=ema)[0].state_dict() for name, ema in (("model", False), ("ema", True))}


def assert_same_weights(run_dir, reference_dir) -> None:
    ours, reference = final_weights(run_dir), final_weights(reference_dir)
    for name in ("model", "ema"):
        unequal = [k for k, v in reference[name].items() if not torch.equal(ours[name][k], v)]
        assert not unequal, f"{name} weights differ from the uninterrupted job's: {unequal[:5]}"


def run_to_end(cfg: TrainConfig, cluster: ClusterConfig, timeout_s: float) -> list:
    return results_within(submit_training(cfg, cluster), timeout_s)


def test_local_job_preempted_matches_the_uninterrupted_job(tmp_path):
    steps = 300
    cluster = ClusterConfig(kind="local", tasks_per_node=2, time_min=60, signal_delay_s=30)
    reference = tiny_run(tmp_path / "reference", steps)
    run_to_end(reference, cluster, 300)
    assert trained_steps(reference.run_dir) == list(range(1, steps + 1))

    cfg = tiny_run(tmp_path / "run", steps)
    job = submit_training(cfg, cluster)
    wait_until(lambda: len(trained_steps(cfg.run_dir)) >= 60, 120, "60 steps")
    for pid in local_task_pids(job):  # what SLURM's preemption does to each task
        os.kill(pid, signal.SIGUSR2)
    results = results_within(job, 300, cfg.run_dir)
    assert [(r.status, r.step) for r in results] == [("finished", steps)] * 2
    requeued = [r for r in read_status(cfg.run_dir)["jobs"] if r["state"] == "requeued"]
    assert [r["reason"] for r in requeued] == ["preempted"] and 60 <= requeued[0]["end_step"] < steps
    assert trained_steps(cfg.run_dir) == list(range(1, steps + 1))  # none twice, none skipped
    assert_same_weights(cfg.run_dir, reference.run_dir)


def slurm_debug(**overrides) -> ClusterConfig:
    fields = dict(kind="slurm", partition="debug", tasks_per_node=2, cpus_per_task=1, time_min=60, signal_delay_s=30)
    return ClusterConfig(**(fields | overrides))


@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_job_through_a_real_time_limit_matches_the_uninterrupted_job(tmp_path):
    # slurmctld sends USR2 30 to 60 s into a 2-minute job with a 60 s signal delay; these
    # 900 steps of a wider DiT take over a minute, so the first job always hits the limit.
    # The uninterrupted reference trains beside it (it only slows the limited job down).
    def wider(run_dir):
        return tiny_run(run_dir, 900, depth=4, hidden_size=128, batch=64)

    cfg, reference = wider(tmp_path / "run"), wider(tmp_path / "reference")
    job = submit_training(cfg, slurm_debug(time_min=2, signal_delay_s=60))
    run_to_end(reference, slurm_debug(), 400)
    results = results_within(job, 600, cfg.run_dir)
    assert [(r.status, r.step) for r in results] == [("finished", 900)] * 2
    requeued = [r for r in read_status(cfg.run_dir)["jobs"] if r["state"] == "requeued"]
    assert requeued and {r["reason"] for r in requeued} == {"time limit"}
    assert "TIMEOUT" not in sacct_states(job.job_id)  # every stop came before SLURM's kill
    assert trained_steps(cfg.run_dir) == list(range(1, 901))
    assert_same_weights(cfg.run_dir, reference.run_dir)


@pytest.mark.usefixtures("slurm_cluster")
def test_slurm_job_preempted_twice_matches_the_uninterrupted_job(tmp_path):
    steps = 300
    cluster = slurm_debug()
    reference = tiny_run(tmp_path / "reference", steps)
    run_to_end(reference, cluster, 300)

    cfg = tiny_run(tmp_path / "run", steps)
    job = submit_training(cfg, cluster)
    wait_until(lambda: len(trained_steps(cfg.run_dir)) >= 60, 120, "60 steps")
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)  # what a preemption sends
    wait_until(lambda: ledger_states(cfg.run_dir).count("running") == 2, 60, "the requeued job to start")
    wait_until(lambda: len(trained_steps(cfg.run_dir)) >= 150, 120, "150 steps")
    preempt_paused(job.job_id, lambda: subprocess.run(  # a job that needs the whole node
        ["sbatch", "--parsable", "--partition=urgent", "--exclusive", "--output=/dev/null", "--wrap=sleep 1"],
        check=True, capture_output=True))

    results = results_within(job, 300, cfg.run_dir)
    assert [(r.status, r.step) for r in results] == [("finished", steps)] * 2
    requeued = [r for r in read_status(cfg.run_dir)["jobs"] if r["state"] == "requeued"]
    assert [r["reason"] for r in requeued] == ["preempted", "preempted"]
    assert 60 <= requeued[0]["end_step"] < requeued[1]["end_step"] < steps
    assert trained_steps(cfg.run_dir) == list(range(1, steps + 1))
    assert_same_weights(cfg.run_dir, reference.run_dir)


@pytest.mark.usefixtures("slurm_cluster")
def test_dtr_scale_train_follows_its_slurm_job_through_a_preemption_to_the_end(tmp_path):
    run_dir, steps = tmp_path / "run", 300
    command = [str(Path(sys.executable).parent / "dtr-scale"), "train", f"run_dir={run_dir}", "cluster=slurm_debug",
               "cluster.follow=true", "data=synthetic", "data.num_samples=256", "model.depth=2",
               "model.hidden_size=64", f"steps={steps}", "global_batch_size=16", "logging.every=1",
               "logging.wandb=disabled", "sample_at_end=0", "checkpoint.every=10000"]
    follower = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: (run_dir / "metrics.jsonl").exists() and len(trained_steps(run_dir)) >= 30, 120,
                   "30 steps")
        job_id = read_status(run_dir)["job_id"]
        preempt_paused(job_id, lambda: subprocess.run(  # a job that needs the whole node
            ["sbatch", "--parsable", "--partition=urgent", "--exclusive", "--output=/dev/null", "--wrap=sleep 1"],
            check=True, capture_output=True))
        out, _ = follower.communicate(timeout=300)
    finally:
        follower.kill()
    assert follower.returncode == 0, out
    assert f"job {job_id} finished" in out and f"training finished at step {steps}" in out
    requeued = [r for r in read_status(run_dir)["jobs"] if r["state"] == "requeued"]
    assert [r["reason"] for r in requeued] == ["preempted"] and 30 <= requeued[0]["end_step"] < steps
    assert trained_steps(run_dir) == list(range(1, steps + 1))
