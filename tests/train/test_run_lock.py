"""One trainer per run directory: a second trainer refuses to start and names the first
(host, pid, SLURM job id); once the first is SIGKILLed a new one starts at once; with two
ranks every rank stops with the same message; a filesystem that cannot lock is named."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtr_scale.train import lock as lock_module
from dtr_scale.train.components import config_from_dict, config_to_dict
from dtr_scale.train.local import run_processes
from dtr_scale.train.lock import LOCK_NAME, RunDirLock, RunDirLockedError, RunDirLockUnsupportedError
from dtr_scale.train.loop import train
from dtr_scale.train.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]


def start_trainer(cfg, tmp_path: Path) -> subprocess.Popen:
    """A real trainer in another process (as SLURM job 4242), running until it is killed."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(config_to_dict(cfg)))
    env = {**os.environ, "SLURM_JOB_ID": "4242", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, str(spec)], env=env, stdout=log, stderr=subprocess.STDOUT)
    lock_file = Path(cfg.run_dir) / LOCK_NAME
    deadline = time.monotonic() + 120
    while not (lock_file.exists() and f'"pid": {proc.pid}' in lock_file.read_text()):
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the first trainer never took the lock"
        time.sleep(0.05)
    return proc


def test_a_second_trainer_refuses_and_names_the_first_until_it_is_killed(tiny_config, tmp_path):
    first_cfg = tiny_config(run_dir=str(tmp_path / "run"), steps=100_000, phema_stds=[],
                            **{"checkpoint.every": 100_000, "logging.every": 1})
    first = start_trainer(first_cfg, tmp_path)
    try:
        second_cfg = dataclasses.replace(first_cfg, steps=2)
        with pytest.raises(RunDirLockedError, match=rf"in use by another trainer: pid {first.pid} on "
                                                     rf"{socket.gethostname()}, SLURM job 4242"):
            train(second_cfg)
        assert first.poll() is None  # the refusal did not disturb the first
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL
    start = time.monotonic()
    result = train(second_cfg)  # at once: the kernel dropped the dead trainer's lock
    assert result.step == 2 and time.monotonic() - start < 60
    assert [r["step"] for r in read_metrics(second_cfg.run_dir)] == [1, 2]  # the killed run's lines dropped


def test_with_two_ranks_both_refuse_while_another_trainer_holds_the_lock(tiny_config, tmp_path):
    cfg = tiny_config(run_dir=str(tmp_path / "run"), steps=2, world_size=2, phema_stds=[], **{"logging.every": 1})
    Path(cfg.run_dir).mkdir(parents=True)
    holder = RunDirLock(cfg.run_dir)
    holder.acquire()  # this process is "the other trainer"
    try:
        with pytest.raises(Exception, match=f"in use by another trainer: pid {os.getpid()}") as raised:
            run_processes(cfg, 2)
        assert "rank 0 could not lock" in str(raised.value) or "in use" in str(raised.value)
    finally:
        holder.release()
    run_processes(cfg, 2)
    assert [r["step"] for r in read_metrics(cfg.run_dir)] == [1, 2]


def test_a_finished_or_failed_trainer_releases_the_lock(tiny_config, tmp_path):
    cfg = tiny_config(run_dir=str(tmp_path / "run"), steps=2, phema_stds=[])
    train(cfg)
    other = RunDirLock(cfg.run_dir)
    other.acquire()  # free again: train() released it on return
    other.release()


def test_a_filesystem_without_locks_is_named(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock_module.fcntl, "flock", no_locks)
    with pytest.raises(RunDirLockUnsupportedError, match="does not support file locks.*DTR_SCALE_NO_RUN_LOCK=1"):
        RunDirLock(tmp_path).acquire()


if __name__ == "__main__":
    train(config_from_dict(json.loads(Path(sys.argv[1]).read_text())))
