"""One trainer per run directory: RUN_DIR/trainer.lock, held with flock for the trainer's lifetime.

The kernel drops a flock when its holder dies, SIGKILL and node loss on NFSv4
included, so a requeued job takes the lock at once, with no stale-lock
timeout. The file names the holder (host, pid, SLURM job id) for the error
message of a second trainer. Rank 0 takes the lock for the whole job and tells
the other ranks whether it got it, so every rank stops with the same message.

Filesystems that cannot lock (Lustre mounted without `-o flock`, some FUSE
mounts) are reported as such; DTR_SCALE_NO_RUN_LOCK=1 runs without the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

LOCK_NAME = "trainer.lock"
NO_LOCK_ENV = "DTR_SCALE_NO_RUN_LOCK"
log = logging.getLogger(__name__)

# The locks this process holds, by path: a train() that raised before releasing its lock
# leaves it here, and a later train() of the same process on the same run takes it over.
_held: dict[Path, "RunDirLock"] = {}


class RunDirLockedError(RuntimeError):
    """Another live trainer holds the run directory; the message names it."""


class RunDirLockUnsupportedError(OSError):
    """The run directory's filesystem cannot lock files."""


def holder_info() -> dict[str, object]:
    """Who holds the lock: written into the lock file for a second trainer's error message."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
    except json.JSONDecodeError:
        return "an unknown process (the lock file names none)"
    job = f", SLURM job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return f"pid {info.get('pid')} on {info.get('host')}{job}, since {info.get('since')}"


class RunDirLock:
    """An exclusive flock on RUN_DIR/trainer.lock; `release()` or process death frees it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir).resolve() / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        stale = _held.pop(self.path, None)
        if stale is not None:
            stale.release()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            text = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunDirLockedError(
                    f"{self.path.parent} is in use by another trainer: {describe_holder(text)}. Two trainers on "
                    f"one run directory overwrite each other's checkpoints and metrics; stop that one (or wait "
                    f"for it to finish), or give this run another run_dir") from err
            raise RunDirLockUnsupportedError(
                err.errno, f"cannot lock {self.path} ({os.strerror(err.errno)}): this filesystem does not support "
                f"file locks (on Lustre, mount with -o flock). Put run_dir on one that does, or set {NO_LOCK_ENV}=1 "
                f"to train without the lock, making sure yourself that no other trainer uses this run directory") from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
        self.fd = fd
        _held[self.path] = self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None
            _held.pop(self.path, None)


def lock_run_dir(run_dir: str | Path, world) -> RunDirLock | None:
    """Take the run directory's lock on rank 0 for the job; every rank raises if it is held.

    Returns the lock (rank 0) or None (other ranks, or with DTR_SCALE_NO_RUN_LOCK=1)."""
    if os.environ.get(NO_LOCK_ENV) == "1":
        log.warning("%s=1: training in %s without the run-directory lock", NO_LOCK_ENV, run_dir)
        return None
    lock, error = None, None
    if world.rank == 0:
        lock = RunDirLock(run_dir)
        try:
            lock.acquire()
        except (RunDirLockedError, RunDirLockUnsupportedError) as err:
            lock, error = None, err
    if world.size > 1 and dist.is_initialized():
        message = [None if error is None else str(error)]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and error is None:
            raise RunDirLockedError(f"rank 0 could not lock the run directory: {message[0]}")
    if error is not None:
        raise error
    return lock
