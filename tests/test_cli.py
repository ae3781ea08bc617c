"""`dtr-scale`: every subcommand answers --help with its options (the Hydra ones with the config
groups and an example), and a wrong config fails before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DTR_SCALE = str(Path(sys.executable).parent / "dtr-scale")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([DTR_SCALE, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_without_a_subcommand_it_lists_them():
    out = run().stdout
    for command in ("prep", "train", "eval", "plan", "status", "compare", "export"):
        assert f"dtr-scale {command}" in out


def test_train_help_shows_the_config_groups_and_examples():
    out = run("train", "--help").stdout
    assert "Config groups (group=option):" in out
    for group in ("model: dit_b2, dit_b4, dit_l2", "routing: dtr, none, random", "weighting: ant_uw, min_snr",
                  "cluster: example_cluster, local, slurm_debug", "backend: ddp, deepspeed, fsdp"):
        assert group in out
    assert "experiment/dtr_paper: base, dit_l2_dtr_antuw_2m" in out
    assert "dtr-scale train experiment=dtr_paper/dit_l2_dtr_antuw_2m cluster=my_slurm" in out


@pytest.mark.parametrize("command, expected", [
    ("plan", "Config groups (group=option):"),
    ("eval", "--watch"),
    ("status", "run_dir"),
    ("compare", "sweep folder"),
    ("export", "safetensors"),
    ("prep", "digits"),
])
def test_every_subcommand_has_help(command, expected):
    done = run(command, "--help")
    assert done.returncode == 0 and expected in done.stdout


def test_a_wrong_key_or_value_fails_before_any_work(tmp_path):
    bad_key = run("train", f"run_dir={tmp_path}/a", "+backend.zero_stages=4", cwd=tmp_path)
    assert bad_key.returncode == 2 and "zero_stages" in bad_key.stdout + bad_key.stderr
    bad_value = run("train", f"run_dir={tmp_path}/b", "backend=deepspeed", "backend.zero_stage=4", cwd=tmp_path)
    assert bad_value.returncode == 2
    assert "backend.zero_stage: got 4, DeepSpeed ZeRO has stages 1, 2, 3" in bad_value.stdout + bad_value.stderr
    assert not (tmp_path / "a" / "checkpoints").exists() and not (tmp_path / "b" / "jobs.jsonl").exists()
    assert not (tmp_path / "data").exists()  # not even the digits were prepared
