"""The real trainer on a real two-node SLURM (slurm/start-cluster.sh nodes=2: node1 and node2
are separate network namespaces with their own hostnames and addresses, the controller a
third): ranks, local ranks and the rendezvous address across nodes, weights bit-equal to
the same world trained by the local launcher on one machine, preemption and time limits
that stop every rank on both nodes at one step, a rank killed on node2, a resume on one
node, and evaluation jobs at save time. Submitted through submitit with the cluster's
client commands on PATH, as from a login node."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import cloudpickle
import pytest
import submitit
import torch

from dtr_scale.config import ClusterConfig, TrainConfig, to_train_config
from dtr_scale.eval.results import read_results
from dtr_scale.eval.work_log import work_path
from dtr_scale.launch.environment import export_distributed_env, master_port
from dtr_scale.launch.ledger import read_status
from dtr_scale.launch.submit import submit_training
from dtr_scale.run import submit_run
from dtr_scale.train.checkpoint import latest_checkpoint
from dtr_scale.train.local import run_processes
from dtr_scale.train.loop import train
from dtr_scale.train.metrics import read_metrics
from launch_helpers import (ledger_states, load_preset, preempt_paused, results_within, sacct_states,
                            slurm_task_pids, wait_until)
from test_training_jobs import assert_same_weights, final_weights, tiny_run, trained_steps

pytestmark = pytest.mark.usefixtures("slurm_two_nodes")
# Jobs unpickle place_task in a fresh interpreter where this test module is not importable.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

HEAD = "10.77.0.1"
NODE_ADDRESS = {"node1": "10.77.0.11", "node2": "10.77.0.12"}


def two_nodes(tasks_per_node: int = 1, **overrides) -> ClusterConfig:
    """The cluster preset as `cluster=slurm_two_nodes` (or _2x2) composes it, plus overrides."""
    preset = "slurm_two_nodes" if tasks_per_node == 1 else "slurm_two_nodes_2x2"
    return replace(load_preset(preset, world_size=2 * tasks_per_node), **overrides)


def run_of(run_dir: Path, steps: int, world_size: int, checkpoint_every: int = 10_000) -> TrainConfig:
    """The tiny DiT + DTR + ANT-UW run of the single-node job tests, on `world_size` processes."""
    cfg = tiny_run(run_dir, steps)
    cfg.world_size = world_size
    cfg.checkpoint.every = checkpoint_every
    return cfg


def test_the_subnet_is_unreachable_from_this_machines_namespace():
    # A SLURM client run here by mistake must fail, not send the head's packets out the default route.
    route = subprocess.run(["ip", "route", "get", HEAD], capture_output=True, text=True)
    assert route.returncode != 0 and "No route to host" in route.stderr, route
    assert "unreachable 10.77.0.0/24" in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    # Inside the cluster the head is on the node's own link, no gateway either way.
    on_node = subprocess.run(["on-node", "node2", "ip", "route", "get", HEAD], capture_output=True, text=True)
    assert on_node.returncode == 0 and " dev eth0 " in on_node.stdout and " via " not in on_node.stdout


def place_task() -> dict:
    """A job's task: where it runs and the torch.distributed variables it gets."""
    env = export_distributed_env(submitit.JobEnvironment())
    return {"host": socket.gethostname(), "node_id": os.environ["SLURM_NODEID"], **env}


def test_ranks_local_ranks_and_master_address_across_nodes(tmp_path):
    executor = submitit.SlurmExecutor(tmp_path / "%j")
    executor.update_parameters(nodes=2, ntasks_per_node=2, cpus_per_task=1, time=5, partition="debug")
    jobs = [executor.submit(place_task) for _ in range(2)]  # two jobs at once on the same two nodes
    tasks = [results_within(job, 120) for job in jobs]
    for job, placed in zip(jobs, tasks):
        assert [(t["host"], t["RANK"], t["LOCAL_RANK"], t["LOCAL_WORLD_SIZE"], t["WORLD_SIZE"]) for t in placed] == [
            ("node1", "0", "0", "2", "4"), ("node1", "1", "1", "2", "4"),
            ("node2", "2", "0", "2", "4"), ("node2", "3", "1", "2", "4")]
        # Rank 0's node by its address on the cluster's network, never a loopback address.
        assert {t["MASTER_ADDR"] for t in placed} == {NODE_ADDRESS["node1"]}
        assert {t["MASTER_PORT"] for t in placed} == {str(master_port(job.job_id))}
    assert tasks[0][0]["MASTER_PORT"] != tasks[1][0]["MASTER_PORT"]


def logged_once(run_dir, steps: int) -> None:
    assert trained_steps(run_dir) == list(range(1, steps + 1)), "a step was logged twice or not at all"


def test_2x2_trainer_matches_the_same_world_on_one_machine_and_resumes_on_one_node(tmp_path):
    steps, more = 12, 18
    reference = run_of(tmp_path / "reference", steps, world_size=4)
    run_processes(reference, 4)
    cfg = run_of(tmp_path / "run", steps, world_size=4)
    results = results_within(submit_training(cfg, two_nodes(tasks_per_node=2)), 240)
    assert [(r.status, r.step) for r in results] == [("finished", steps)] * 4
    logged_once(cfg.run_dir, steps)
    assert ledger_states(cfg.run_dir) == ["running", "finished"]  # written by global rank 0 only
    assert read_status(cfg.run_dir)["jobs"][0]["node"] == "node1"
    assert_same_weights(cfg.run_dir, reference.run_dir)

    # The 2-node run goes on in one process, on one node: the trajectory of a run that was one
    # process throughout, within the tolerance of the cross-world-size tests (the batch's sums
    # split differently across ranks differ in the last bits).
    single = run_of(tmp_path / "single", more, world_size=1)
    train(single)
    train(run_of(Path(cfg.run_dir), more, world_size=1))
    logged_once(cfg.run_dir, more)
    ours, theirs = (torch.tensor([r["loss"] for r in read_metrics(d)]) for d in (cfg.run_dir, single.run_dir))
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-6)
    a, b = final_weights(cfg.run_dir), final_weights(single.run_dir)
    for name in ("model", "ema"):  # Adam divides by tiny second moments: looser on the weights
        for key, value in b[name].items():
            torch.testing.assert_close(a[name][key], value, rtol=1e-3, atol=1e-5, msg=f"{name}: {key}")


def task_pid(node: str, job_id: str, rank: int) -> int:
    """The PID (in this machine's namespace) of a job's task of `rank`, which runs on `node`."""
    on_node = set(subprocess.run(["ip", "netns", "pids", f"dtrn-{node}"], capture_output=True, text=True).stdout.split())
    found = [pid for pid in slurm_task_pids(job_id, rank) if str(pid) in on_node]
    if len(found) != 1:
        raise LookupError(f"no single task of rank {rank} of job {job_id} on {node}: {found}")
    return found[0]


def test_2x1_job_preempted_twice_matches_the_same_world_on_one_machine(tmp_path):
    steps = 60
    reference = run_of(tmp_path / "reference", steps, world_size=2)
    run_processes(reference, 2)
    cfg = run_of(tmp_path / "run", steps, world_size=2)
    job = submit_training(cfg, two_nodes())
    wait_until(lambda: len(trained_steps(cfg.run_dir)) >= 10, 180, "10 steps")
    # 1: the stop flag raised on node2 alone (rank 1) stops both ranks at one step.
    os.kill(task_pid("node2", job.job_id, 1), signal.SIGUSR2)
    wait_until(lambda: ledger_states(cfg.run_dir).count("running") == 2, 120, "the requeued job to start")
    wait_until(lambda: len(trained_steps(cfg.run_dir)) >= 30, 180, "30 steps")
    # 2: a job in the higher-priority partition needs both nodes: SLURM signals every task.
    urgent = []
    preempt_paused(job.job_id, lambda: urgent.append(subprocess.run(
        ["sbatch", "--parsable", "--partition=urgent", "--nodes=2", "--exclusive", "--output=/dev/null",
         "--wrap=sleep 1"], check=True, capture_output=True, text=True).stdout.strip()))

    results = results_within(job, 300, cfg.run_dir)
    assert [(r.status, r.step) for r in results] == [("finished", steps)] * 2
    status = read_status(cfg.run_dir)
    requeued = [r for r in status["jobs"] if r["state"] == "requeued"]
    assert [r["reason"] for r in requeued] == ["preempted", "preempted"]
    assert 10 <= requeued[0]["end_step"] < requeued[1]["end_step"] < steps
    assert (status["state"], status["requeues"]) == ("finished", 2)
    logged_once(cfg.run_dir, steps)  # every rank stopped at the same step: none lost, none repeated
    assert_same_weights(cfg.run_dir, reference.run_dir)
    wait_until(lambda: sacct_states(urgent[0]) == ["COMPLETED"], 30, "the urgent job to complete")
    runs = sacct_states(job.job_id)
    assert len(runs) == 3 and set(runs[:2]) <= {"REQUEUED", "PREEMPTED"}


def test_2x1_job_through_a_real_time_limit_matches_the_same_world_on_one_machine(tmp_path):
    # slurmctld checks limits every 30 s: USR2 comes 30 to 60 s into a 2-minute job with a
    # 60 s signal delay. The run is longer than the test; once the limit has requeued it and
    # the next job trained on, a last stop (our own USR2) writes step m and the job is
    # cancelled; its step m is compared with an uninterrupted run of m steps.
    cfg = run_of(tmp_path / "run", 1_000_000, world_size=2)
    job = submit_training(cfg, two_nodes(time_min=2, signal_delay_s=60, max_requeues=10))
    try:
        wait_until(lambda: "requeued" in ledger_states(cfg.run_dir), 180, "the time limit to requeue the job")
        first_stop = [r for r in read_status(cfg.run_dir)["jobs"] if r["state"] == "requeued"][0]["end_step"]
        wait_until(lambda: len(trained_steps(cfg.run_dir)) >= first_stop + 5, 180, "5 steps after the requeue")
        subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
        wait_until(lambda: ledger_states(cfg.run_dir).count("requeued") == 2, 120, "the last stop")
    finally:
        job.cancel(check=False)
    requeued = [r for r in read_status(cfg.run_dir)["jobs"] if r["state"] == "requeued"]
    assert {r["reason"] for r in requeued} == {"time limit"}
    last = requeued[1]["end_step"]
    assert first_stop < last and trained_steps(cfg.run_dir)[:last] == list(range(1, last + 1))
    assert latest_checkpoint(cfg.run_dir).name == f"step_{last:08d}"
    reference = run_of(tmp_path / "reference", last, world_size=2)
    run_processes(reference, 2)
    assert_same_weights(cfg.run_dir, reference.run_dir)


def test_a_rank_killed_on_node2_fails_the_job_naming_node_and_rank(tmp_path):
    cfg = run_of(tmp_path / "run", 1_000_000, world_size=2, checkpoint_every=5)
    job = submit_training(cfg, two_nodes())
    wait_until(lambda: len(trained_steps(cfg.run_dir)) >= 12, 180, "12 steps")
    os.kill(task_pid("node2", job.job_id, 1), signal.SIGKILL)
    # Either rank 0 sees its collective fail first and names the peer it lost, or srun ends the
    # whole step (--kill-on-bad-exit) first and says which task died where (its task number is
    # the global rank); the job's error carries the one or the other.
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="rank 1 on node2|node2: task 1: Killed"):
        results_within(job, 120)
    failed = [r for r in read_status(cfg.run_dir)["jobs"] if r["state"] == "failed"]
    assert all(r["error"].startswith("PeerLostError: rank 0 on node1: rank 1 on node2 went away") for r in failed)
    wait_until(lambda: sacct_states(job.job_id) == ["FAILED"], 30, "sacct to show the job FAILED")
    time.sleep(2)  # a requeue would show as a second run
    assert sacct_states(job.job_id) == ["FAILED"]
    # The last complete checkpoint (a save in flight when the rank died is not complete) loads.
    ckpt = latest_checkpoint(cfg.run_dir)
    assert ckpt is not None and int(ckpt.name.removeprefix("step_")) % 5 == 0
    weights = final_weights(cfg.run_dir)
    assert weights["model"].keys() == weights["ema"].keys() and len(weights["model"]) > 0


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from dtr_scale.data_prep.digits import prepare_digits

    path = tmp_path_factory.mktemp("digits") / "digits"
    prepare_digits(str(path), format="mds")
    return path


def test_evaluation_jobs_at_save_time_from_a_two_node_job(tmp_path, digits):
    cfg = to_train_config({
        "model": {"name": "DiT-S/2", "input_size": 8, "in_channels": 4, "num_classes": 10,
                  "depth": 2, "hidden_size": 64, "num_heads": 4},
        "routing": {"kind": "dtr"}, "weighting": {"kind": "ant_uw", "num_intervals": 4},
        "diffusion": {"sampling_steps": 10}, "optimizer": {"lr": 1e-3},
        "data": {"kind": "shards", "path": str(digits), "embedded": True},  # scored without a reference batch
        "run_dir": str(tmp_path / "run"), "steps": 20, "global_batch_size": 16, "world_size": 2, "ema_decay": 0.9,
        "sample_at_end": 0, "checkpoint": {"every": 10, "keep_last": 5}, "logging": {"every": 1, "wandb": "disabled"},
        "eval": {"every": 10, "num_samples": 20, "batch_size": 10, "averaging": ["ema"], "at_save": True},
    })
    cfg.cluster = two_nodes()
    results = results_within(submit_run(cfg), 300)
    assert [(r.status, r.step) for r in results] == [("finished", 20)] * 2
    # Global rank 0 (node1) submitted one evaluation job per due checkpoint, from inside the cluster.
    events = [json.loads(line) for line in work_path(cfg.run_dir).read_text().splitlines()]
    assert [(e["event"], e["host"]) for e in events] == [("submitted", "node1")] * 2  # steps 10 and 20
    wait_until(lambda: len(read_results(cfg.run_dir)) >= 2, 300, "both evaluations")
    assert sorted(r["step"] for r in read_results(cfg.run_dir)) == [10, 20]  # each evaluated exactly once
    assert all(r["digits_fd"] > 0 and r["num_samples"] == 20 for r in read_results(cfg.run_dir))


def test_a_plain_srun_across_two_nodes_gives_the_local_launchers_losses(tmp_path):
    # No submitit: a batch script's `srun dtr-scale train ...` starts one rank per task, and
    # each joins the world SLURM describes (SLURM_PROCID, SLURM_LOCALID, the first node's address).
    from test_launched_world import BIN, train_args

    local = subprocess.run([str(BIN / "dtr-scale"), *train_args(tmp_path / "local")],
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    command = " ".join([str(BIN / "dtr-scale"), *train_args(tmp_path / "srun")]).replace("[]", "'[]'")
    job = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1",
                          f"--output={tmp_path}/%j.out", f"--chdir={tmp_path}",
                          f"--wrap=srun --kill-on-bad-exit=1 {command}"],
                         check=True, capture_output=True, text=True).stdout.strip()
    wait_until(lambda: sacct_states(job) and sacct_states(job)[-1] not in ("PENDING", "RUNNING"), 300,
               "the srun job to end")
    assert sacct_states(job) == ["COMPLETED"], (tmp_path / f"{job}.out").read_text()[-3000:]
    losses = {name: [(r["step"], r["loss"]) for r in read_metrics(tmp_path / name)] for name in ("local", "srun")}
    assert [step for step, _ in losses["srun"]] == list(range(1, 7))  # each step logged once, by rank 0
    assert losses["srun"] == losses["local"]
