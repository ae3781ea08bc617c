"""Launch the way clusters do: a process that torchrun or a plain `srun` started as one rank
joins that world instead of starting its own processes, and trains exactly what the
project's own local launcher trains."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dtr_scale.launch.environment import launched_world, master_address, master_port
from dtr_scale.train.metrics import read_metrics

BIN = Path(sys.executable).parent


def test_torchrun_variables_are_taken_as_they_are():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}
    assert launched_world(env) == {k: v for k, v in env.items() if not k.startswith("SLURM")}


def test_a_half_set_torch_world_is_an_error_that_says_what_to_do():
    with pytest.raises(RuntimeError, match="MASTER_ADDR, MASTER_PORT not.*torchrun"):
        launched_world({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})


def test_srun_task_gets_ranks_from_slurm_and_rank_0s_host_address(monkeypatch):
    # Task 3 of `srun -N2 --ntasks-per-node=2`, on the second node; the first host is this machine.
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
             "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
             "SLURM_JOB_NODELIST": "localhost,other"}
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    # Two nodes cannot meet on a loopback address: the error names the host and the fix.
    with pytest.raises(RuntimeError, match="'localhost' resolves to the loopback address 127.0.0.1"):
        launched_world(slurm)
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[7-8]")
    monkeypatch.setattr("socket.gethostbyname", {"node7": "10.0.0.7", "node8": "10.0.0.8"}.__getitem__)
    assert launched_world(slurm) == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                                     "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": str(master_port("4242"))}


def test_a_batch_script_is_no_world():
    # sbatch's script has SLURM_PROCID=0 but no step: it is where srun or a submission starts.
    assert launched_world({"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) is None
    assert launched_world({}) is None


def test_one_node_may_meet_on_loopback():
    assert master_address("localhost", num_nodes=1) == "127.0.0.1"


def train_args(run_dir: Path) -> list[str]:
    return ["train", "cluster=none", "data=synthetic", "data.num_samples=256", "model.depth=2",
            "model.hidden_size=64", "model.num_classes=4", "steps=6", "global_batch_size=16", "world_size=2",
            "logging.every=1", "logging.wandb=disabled", "sample_at_end=0", "phema_stds=[]",
            "checkpoint.every=3", f"run_dir={run_dir}"]


def test_torchrun_gives_the_local_launchers_losses(tmp_path):
    local = subprocess.run([str(BIN / "dtr-scale"), *train_args(tmp_path / "local")],
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    torchrun = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python",
                               str(BIN / "dtr-scale"), *train_args(tmp_path / "torchrun")],
                              capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    losses = {name: [(r["step"], r["loss"]) for r in read_metrics(tmp_path / name)] for name in ("local", "torchrun")}
    assert [step for step, _ in losses["local"]] == list(range(1, 7))  # each step logged once, by rank 0
    assert losses["torchrun"] == losses["local"]
