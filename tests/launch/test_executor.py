"""Executors built from cluster configs: sbatch flags, local parameters, requeue budget."""

from __future__ import annotations

import pytest
import submitit
from submitit.slurm.slurm import _make_sbatch_string

from dtr_scale.config import ConfigError
from dtr_scale.config import ClusterConfig
from dtr_scale.launch.submit import submit_training
from dtr_scale.launch.executor import make_executor, max_requeues, requeue_budget
from stand_in_trainer import StandInConfig
from launch_helpers import load_preset


@pytest.fixture
def fake_srun(tmp_path, monkeypatch):
    """submitit builds a SlurmExecutor only where `srun` is on PATH; nothing is submitted."""
    srun = tmp_path / "bin" / "srun"
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{__import__('os').environ['PATH']}")


def sbatch_text(executor: submitit.SlurmExecutor) -> str:
    return _make_sbatch_string(command="python -m submitit.core._submit X", folder=executor.folder,
                               **executor.parameters)


def test_requeue_budget_fits_a_2m_step_run():
    # 2M steps at 0.5 s in 24 h jobs whose last 2 minutes are for the checkpoint:
    # 1e6 s / 86280 s = 11.6 -> 12 segments -> 2 x 12 + 3 requeues.
    assert requeue_budget(2_000_000, 0.5, 1440, 120) == 27
    assert requeue_budget(10, 0.1, 60, 30) == 5  # one segment
    assert max_requeues(ClusterConfig(max_requeues=7), steps=2_000_000) == 7


def test_local_preset_builds_a_local_executor(tmp_path):
    executor = make_executor(load_preset("local"), tmp_path / "%j", steps=1000)
    assert isinstance(executor, submitit.LocalExecutor)
    assert executor.parameters == {"tasks_per_node": 2, "gpus_per_node": 0, "timeout_min": 1440,
                                   "signal_delay_s": 120}
    assert executor.max_num_timeout == requeue_budget(1000, 1.0, 1440, 120)


def test_slurm_debug_preset_sbatch_flags(tmp_path, fake_srun):
    executor = make_executor(load_preset("slurm_debug"), tmp_path / "%j", steps=100_000)
    assert isinstance(executor, submitit.SlurmExecutor)
    assert executor.max_num_timeout == 2 * 29 + 3  # 100k s of steps / (3600 - 30) s per job
    text = sbatch_text(executor)
    for line in ("#SBATCH --partition=debug", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --cpus-per-task=1", "#SBATCH --time=60", "#SBATCH --signal=USR2@30"):
        assert line in text
    assert "srun --unbuffered" in text and "--kill-on-bad-exit=1" in text
    assert "--gpus-per-node" not in text and "--mem" not in text


def test_real_cluster_template_sbatch_flags(tmp_path, fake_srun):
    executor = make_executor(load_preset("example_cluster", world_size=8), tmp_path / "%j", steps=2_000_000)
    text = sbatch_text(executor)
    for line in ("#SBATCH --account=my_project", "#SBATCH --nodes=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --ntasks-per-node=8", "#SBATCH --cpus-per-task=10", "#SBATCH --mem=491520MB",
                 "#SBATCH --time=1440", "#SBATCH --signal=USR2@300", "#SBATCH --exclusive",
                 "#SBATCH --requeue", "module load cuda/12.4"):
        assert line in text
    assert "--qos" not in text and "--constraint" not in text
    assert executor.max_num_timeout == 23


def test_slurm_without_srun_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="start-cluster.sh"):
        make_executor(ClusterConfig(kind="slurm"), tmp_path, steps=10)


def test_world_size_mismatch_fails_before_submitting(tmp_path):
    cfg = StandInConfig(run_dir=str(tmp_path / "run"), world_size=4)
    with pytest.raises(ConfigError, match="world_size"):
        submit_training(cfg, ClusterConfig(kind="local", tasks_per_node=2))
    assert not (tmp_path / "run").exists()
