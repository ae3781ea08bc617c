"""`dtr-scale plan` on the command line: Hydra overrides plus --gpu, nothing written to disk."""

import subprocess
import sys

from plan_helpers import experiment_override

from dtr_scale.plan.cli import pop_gpu_flag


def test_gpu_flag_is_taken_out_before_hydra_sees_the_arguments():
    argv = ["dtr-scale plan", "cluster=example_cluster", "--gpu", "a100_80gb", "steps=10"]
    assert pop_gpu_flag(argv) == "a100_80gb" and argv == ["dtr-scale plan", "cluster=example_cluster", "steps=10"]
    argv = ["dtr-scale plan", "--gpu=h200"]
    assert pop_gpu_flag(argv) == "h200" and argv == ["dtr-scale plan"]
    assert pop_gpu_flag(["dtr-scale plan", "steps=10"]) is None


def test_plan_command_prints_the_plan_and_writes_nothing(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "dtr_scale.plan.cli", experiment_override("dtr_paper/dit_l2_dtr_antuw_2m"),
         "cluster=example_cluster", "--gpu", "a100_80gb"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "dtr-scale plan: DiT-L/2 on 8 x a100_80gb" in run.stdout and "GPU-hours" in run.stdout
    assert list(tmp_path.iterdir()) == []

