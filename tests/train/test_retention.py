"""Retention through the command a user types: the checkpoints of eval.milestones (the steps the
full protocol scores) are kept whatever checkpoint.keep_last says; the others go as before."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dtr_scale.train.checkpoint import checkpoint_dir, checkpoint_name, read_manifest

DTR_SCALE = str(Path(sys.executable).parent / "dtr-scale")
# four steps, a checkpoint every two, only the newest kept; nothing evaluated beside training
SHORT = ["cluster=none", "world_size=1", "data=synthetic", "model=tiny", "steps=4", "global_batch_size=8",
         "checkpoint.every=2", "checkpoint.keep_last=1", "eval.inline=false", "logging.wandb=disabled",
         "sample_at_end=0", "phema_stds=[]"]


@pytest.mark.parametrize("milestones, kept", [(["eval.milestones=[2]"], [2, 4]), ([], [4])],
                         ids=["milestone_2", "no_milestones"])
def test_keep_last_1_keeps_the_milestone_checkpoints_too(tmp_path, milestones, kept):
    run_dir = tmp_path / "run"
    done = subprocess.run([DTR_SCALE, "train", f"run_dir={run_dir}", *SHORT, *milestones], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:]
    assert [e["step"] for e in read_manifest(run_dir)] == kept
    on_disk = sorted(p.name for p in checkpoint_dir(run_dir).iterdir() if p.is_dir())
    assert on_disk == [checkpoint_name(step) for step in kept]  # step 2 deleted without the milestone
