"""Nothing lost, nothing twice, across crashes:

- a SIGKILL right after a checkpoint commits, or right after a metrics line past the
  checkpoint, then a resume: metrics.jsonl holds steps 1..N once each, every post-hoc EMA
  snapshot of the grid exists, and each equals the uninterrupted run's bitwise;
- a NaN stop while an asynchronous save is in flight commits that checkpoint.

The killed runs are this file run as a script in a child process, which patches the
trainer to SIGKILL itself at the chosen point.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dtr_scale.train.checkpoint import checkpoint_dir, checkpoint_name, read_manifest, require_complete
from dtr_scale.train.components import config_from_dict, config_to_dict
from dtr_scale.train.loop import NonFiniteLossError, train
from dtr_scale.train.metrics import read_metrics
from dtr_scale.train.phema import MissingSnapshotsError, require_snapshots, snapshot_inventory

REPO = Path(__file__).resolve().parents[2]
EVERY, STEPS = 2, 6


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    if spec["kill"] == "after_commit":  # between the commit of checkpoint 4 and anything after it
        from dtr_scale.train.checkpoint import CheckpointManager

        real_commit = CheckpointManager._commit

        def commit_then_die(self, step, partial, digests):
            real_commit(self, step, partial, digests)
            if step == 4:
                die()

        CheckpointManager._commit = commit_then_die
    else:  # just after the line of step 5, logged past checkpoint 4, and a torn line after it
        from dtr_scale.train.metrics import MetricsLogger

        real_write = MetricsLogger.write

        def write_then_die(self, record):
            real_write(self, record)
            if record["step"] == 5:
                with open(self.path, "a") as f:
                    f.write('{"step": 6, "loss": 0.')
                die()

        MetricsLogger.write = write_then_die
    train(config_from_dict(spec["config"]))
    sys.exit("training finished without being killed")


def run_killed(cfg, tmp_path: Path, kill: str) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"config": config_to_dict(cfg), "kill": kill, "threads": torch.get_num_threads()}))
    with open(tmp_path / "child.log", "w") as log:
        proc = subprocess.run([sys.executable, __file__, str(spec)], env={**os.environ, "PYTHONPATH": str(REPO)},
                              stdout=log, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "child.log").read_text()[-3000:]


def kill_config(tiny_config, run_dir: Path):
    return tiny_config(run_dir=str(run_dir), steps=STEPS, phema_stds=[0.05, 0.10],
                       **{"checkpoint.every": EVERY, "checkpoint.async_save": False, "logging.every": 1})


@pytest.mark.parametrize("kill", ["after_commit", "after_metrics_line"])
def test_metrics_and_snapshots_exactly_once_across_a_sigkill(tiny_config, tmp_path, kill):
    straight = kill_config(tiny_config, tmp_path / "straight")
    train(straight)
    cfg = kill_config(tiny_config, tmp_path / "killed")
    run_killed(cfg, tmp_path, kill)
    assert [e["step"] for e in read_manifest(cfg.run_dir)] == [2, 4]

    train(cfg)
    records = read_metrics(cfg.run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    want = {r["step"]: r["loss"] for r in read_metrics(straight.run_dir)}
    assert {r["step"]: r["loss"] for r in records} == want
    inventory = snapshot_inventory(cfg.run_dir, cfg, STEPS)
    assert [p.name for p in inventory.present] == [p.name for p in inventory.expected]
    assert len(inventory.expected) == 2 * (STEPS // EVERY)
    for path in inventory.expected:
        got, want_snapshot = load_file(path), load_file(Path(straight.run_dir) / "phema" / path.name)
        assert got.keys() == want_snapshot.keys()
        assert all(torch.equal(got[k], want_snapshot[k]) for k in got), path.name


def test_a_missing_snapshot_is_listed_and_refused(tiny_config, tmp_path):
    cfg = kill_config(tiny_config, tmp_path / "run")
    train(dataclasses.replace(cfg, steps=4))
    require_snapshots(cfg.run_dir, cfg, 4)
    lost = Path(cfg.run_dir) / "phema" / "phema-00000002-0.100.safetensors"
    lost.unlink()
    assert snapshot_inventory(cfg.run_dir, cfg, 4).missing == [lost]
    with pytest.raises(MissingSnapshotsError, match="1 post-hoc EMA snapshot.*phema-00000002-0.100.safetensors"):
        require_snapshots(cfg.run_dir, cfg, 4)


def test_a_nan_stop_commits_the_async_save_in_flight(tiny_config, tmp_path, monkeypatch):
    from torch.distributed.checkpoint import filesystem

    from dtr_scale.train.backends.torch_dist import TorchBackend

    cfg = tiny_config(run_dir=str(tmp_path / "run"), steps=10, phema_stds=[],
                      **{"checkpoint.every": 4, "checkpoint.async_save": True, "health.nan_policy": "stop"})
    # the background write of checkpoint 4 is slow (a busy filesystem): still in flight at step 5
    real_write_item, slow, slept = filesystem._write_item, f"{checkpoint_name(4)}.partial", []

    def slow_write_item(transforms, stream, *args, **kwargs):
        if slow in Path(stream.name).parts and not slept:
            slept.append(True)
            time.sleep(1.5)
        return real_write_item(transforms, stream, *args, **kwargs)

    monkeypatch.setattr(filesystem, "_write_item", slow_write_item)
    real_clip, calls = TorchBackend.clip_grad_norm, {"n": 0}

    def nan_at_step_5(self, max_norm):
        calls["n"] += 1
        norm = real_clip(self, max_norm)
        return torch.full_like(norm, float("nan")) if calls["n"] == 5 else norm

    monkeypatch.setattr(TorchBackend, "clip_grad_norm", nan_at_step_5)
    in_flight = {}
    real_raise = NonFiniteLossError.__init__

    def note_in_flight(self, *args):
        in_flight["partial"] = (checkpoint_dir(cfg.run_dir) / slow).exists()
        in_flight["manifest"] = [e["step"] for e in read_manifest(cfg.run_dir)]
        real_raise(self, *args)

    monkeypatch.setattr(NonFiniteLossError, "__init__", note_in_flight)
    with pytest.raises(NonFiniteLossError, match="step 4"):
        train(cfg)
    assert in_flight == {"partial": True, "manifest": []}  # the save was in flight when the NaN came
    assert [e["step"] for e in read_manifest(cfg.run_dir)] == [4]
    assert not list(checkpoint_dir(cfg.run_dir).glob("*.partial"))
    require_complete(checkpoint_dir(cfg.run_dir) / checkpoint_name(4))


if __name__ == "__main__":
    child(sys.argv[1])
