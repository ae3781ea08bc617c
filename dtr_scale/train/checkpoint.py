"""Checkpoints of a run, as one component: save, retention, "latest", load.

Layout:

    RUN_DIR/checkpoints/manifest.json        the complete checkpoints, oldest first
    RUN_DIR/checkpoints/step_00001000/       one checkpoint: the backend's files
                                   meta.json step, data position, counters, config

A checkpoint is written under `step_N.partial/` and renamed to `step_N/` only
when every rank has finished writing; then the manifest (itself replaced
atomically) gains an entry with the size of every file. "Latest" is the newest
manifest entry whose files are all present at their recorded sizes, so a crash
or a truncated file at any point leaves an earlier checkpoint to resume from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

from dtr_scale.config import CheckpointConfig

MANIFEST = "manifest.json"
META = "meta.json"
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or unreadable; the message names the file."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(run_dir: str | Path) -> list[dict[str, Any]]:
    path = checkpoint_dir(run_dir) / MANIFEST
    return json.loads(path.read_text())["checkpoints"] if path.exists() else []


def verify_checkpoint(path: Path, entry: dict[str, Any]) -> str | None:
    """Why the checkpoint at `path` is not usable, or None if every file is there at its size."""
    for name, size in entry["files"].items():
        f = path / name
        if not f.exists():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, the manifest recorded {size} (truncated?)"
    return None


def checked_checkpoints(run_dir: str | Path) -> list[tuple[int, Path, str | None]]:
    """(step, path, why it is not usable or None) of every manifest entry, oldest first."""
    checked = []
    for entry in read_manifest(run_dir):
        path = checkpoint_dir(run_dir) / entry["name"]
        checked.append((int(entry["step"]), path, verify_checkpoint(path, entry)))
    return checked


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every manifest entry whose files are all there at their recorded sizes,
    oldest first. A `.partial` directory is never in the manifest, so it is never listed."""
    return [(step, path) for step, path, problem in checked_checkpoints(run_dir) if problem is None]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint; damaged ones newer than it are reported and passed over."""
    for _, path, problem in reversed(checked_checkpoints(run_dir)):
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def require_complete(path: str | Path) -> None:
    """Raise CheckpointError naming the missing or truncated file if checkpoint `path` is not
    complete as its manifest entry records it (for loading one checkpoint by name, not "latest")."""
    path = Path(path)
    entry = next((e for e in read_manifest(path.parent.parent) if e["name"] == path.name), None)
    if entry is None:
        raise CheckpointError(f"{path} is not listed in {path.parent / MANIFEST}: it was never completed "
                              f"(a crash while writing?) or is not a dtr-scale checkpoint; pick a listed one")
    problem = verify_checkpoint(path, entry)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}; use an earlier checkpoint")


def read_meta(path: str | Path) -> dict[str, Any]:
    meta = Path(path) / META
    if not meta.exists():
        raise CheckpointError(f"{meta} does not exist: {path} is not a complete dtr-scale checkpoint")
    return json.loads(meta.read_text())


def retained(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """The steps a retention policy keeps: the last `keep_last`, plus every `keep_every`-th."""
    keep = set(sorted(steps)[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


class CheckpointManager:
    """Saves through a backend (asynchronously where it can) and commits complete checkpoints."""

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, backend, world,
                 on_commit: Callable[[Path, int], None] | None = None):
        self.root = checkpoint_dir(run_dir)
        self.on_commit = on_commit  # rank 0, after a checkpoint is complete: (its directory, its step)
        self.cfg = cfg
        self.backend = backend
        self.world = world
        self.pending: tuple[Future, int, Path] | None = None
        self.on_disk_step: int | None = None  # the step this manager last saved or loaded
        self.blocked_seconds = 0.0  # time the training loop spent inside save(), for the step breakdown
        if world.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    def save(self, step: int, meta: dict[str, Any], *, asynchronous: bool | None = None) -> None:
        start = time.perf_counter()
        self.wait()
        # A stop right after a scheduled save, or right after resuming, asks for the same state
        # again; rewriting it would delete the complete copy before the new one is renamed in.
        if step != self.on_disk_step:
            self._write(step, meta, asynchronous)
            self.on_disk_step = step
        self.blocked_seconds += time.perf_counter() - start

    def _write(self, step: int, meta: dict[str, Any], asynchronous: bool | None) -> None:
        partial = self.root / f"{checkpoint_name(step)}.partial"
        if self.world.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # a crashed earlier attempt at this step
            partial.mkdir(parents=True)
            _write_json_atomic(partial / META, meta)
        self._barrier()
        use_async = self.cfg.async_save if asynchronous is None else asynchronous
        future = self.backend.save(partial, asynchronous=use_async)
        if future is None:
            self._barrier()
            self._commit(step, partial)
        else:
            self.pending = (future, step, partial)

    def poll(self) -> None:
        """Commit a finished background save (cheap; call every step)."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        if self.pending is None:
            return
        future, step, partial = self.pending
        self.pending = None
        future.result()
        # DCP's rank 0 finishes only after every rank's data is written: it may commit alone.
        self._commit(step, partial)

    def _commit(self, step: int, partial: Path) -> None:
        if self.world.rank != 0:
            return
        final = self.root / checkpoint_name(step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        files = {str(p.relative_to(final)): p.stat().st_size for p in sorted(final.rglob("*")) if p.is_file()}
        entries = [e for e in read_manifest(self.root.parent) if e["step"] != step]
        entries.append({"step": step, "name": final.name, "files": files, "time": time.time()})
        entries.sort(key=lambda e: e["step"])
        keep = retained([e["step"] for e in entries], self.cfg.keep_last, self.cfg.keep_every)
        _write_json_atomic(self.root / MANIFEST, {"checkpoints": [e for e in entries if e["step"] in keep]})
        for e in entries:
            if e["step"] not in keep:
                shutil.rmtree(self.root / e["name"], ignore_errors=True)
        log.info("checkpoint %s complete", final)
        if self.on_commit is not None:
            self.on_commit(final, step)

    def load_latest(self) -> dict[str, Any] | None:
        """Load the newest complete checkpoint into the backend; its meta, or None for a fresh run."""
        path = latest_checkpoint(self.root.parent)
        return None if path is None else self.load(path)

    def load(self, path: Path) -> dict[str, Any]:
        """Load checkpoint `path` into the backend after checking its files against the manifest; its meta."""
        require_complete(path)
        try:
            self.backend.load(path)
        # DCP's CheckpointException derives from BaseException, so `except Exception` alone let
        # an unreadable DCP checkpoint escape as a bare "CheckpointException ranks:dict_keys([0])"
        except (Exception, CheckpointException) as err:
            raise CheckpointError(f"checkpoint {path} could not be loaded ({type(err).__name__}: {err}); "
                                  f"move it aside to resume from the one before") from err
        meta = read_meta(path)
        self.on_disk_step = meta["step"]
        return meta

    def _barrier(self) -> None:
        if self.world.size > 1:
            dist.barrier()
