"""`dtr-scale plan` on the command line: Hydra overrides plus --gpu, nothing written to disk,
and a setting that cannot work explained on stderr with a non-zero exit status."""

import subprocess
import sys

from plan_helpers import experiment_override


def plan(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dtr_scale.plan.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_plan_command_prints_the_plan_and_writes_nothing(tmp_path):
    # --gpu may come anywhere among Hydra's overrides
    run = plan(experiment_override("dtr_paper/dit_l2_dtr_antuw_2m"), "--gpu", "a100_80gb", "cluster=example_cluster",
               cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "dtr-scale plan: DiT-L/2 on 8 x a100_80gb" in run.stdout and "GPU-hours" in run.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_run_that_cannot_work_is_explained_on_stderr(tmp_path):
    run = plan("--gpu=h100", "global_batch_size=257", cwd=tmp_path)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip() == "dtr-scale plan: config error: global_batch_size: 257 is not divisible by world_size=2"
    assert list(tmp_path.iterdir()) == []
