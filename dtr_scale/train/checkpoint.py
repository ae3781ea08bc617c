"""Checkpoints of a run, as one component: save, retention, "latest", load.

Layout:

    RUN_DIR/checkpoints/manifest.json        the complete checkpoints, oldest first
    RUN_DIR/checkpoints/step_00001000/       one checkpoint: the backend's files
                                   meta.json step, data position, counters, config

A checkpoint is written under `step_N.partial/`. When every rank has finished
writing, rank 0 hashes its files (sha256), writes the manifest (atomically)
with the size and hash of every file, and only then renames the directory to
`step_N/`. "Latest" is the newest manifest entry whose files are all present at
their recorded sizes; loading one also checks the hashes, and a resume passes
over a damaged checkpoint to the one before, so a crash, a truncated file or a
flipped bit leaves an earlier checkpoint to resume from.

A full disk is named, not met as a bare errno: a save is not started where the filesystem
has less free than the newest checkpoint takes (the next one holds the same tensors) or, for
the first save of a run, than the state about to be written takes (`state_bytes`), and a
save that runs out of space anyway is a DiskFullError naming the filesystem, the checkpoint,
the bytes it takes and the bytes free; its partial directory is removed to give the space back.

Nothing read from a checkpoint runs code: each backend reads its own files (DCP's
through `train.safe_dcp`), and this module reads only meta.json and the manifest. The
manager knows no backend beyond `save` and `load`; which keys hold which weights is
the business of the backend that wrote them (`train.backends.read_weights`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from dtr_scale.config import CheckpointConfig, TrainConfig, to_train_config, without_retired_keys
from dtr_scale.io import (
    DiskFullError, atomic_write_json, disk_full_error, free_bytes, fsync_dir, is_disk_full, require_free_space,
)
from dtr_scale.train.manifest import (  # noqa: F401  (re-exported: the checkpoint API in one place)
    MANIFEST, META, CheckpointError, checked_checkpoints, checkpoint_dir, checkpoint_name, complete_checkpoints,
    digest_files, file_digest, latest_checkpoint, newest_checkpoint_bytes, read_manifest, read_meta, require_complete,
    retained, roll_forward, verify_checkpoint,
)
from dtr_scale.world import World

log = logging.getLogger(__name__)


class StateFiles(Protocol):
    """What the manager calls of a backend (`train.backends.Backend` has all three): write and read its
    files, and the optimizer's parameter groups, which size the first save."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        ...

    def save(self, path: Path, *, extra: Mapping[str, Stateful] = ..., asynchronous: bool = False) -> Future | None:
        ...

    def load(self, path: Path, *, extra: Mapping[str, Stateful] = ...) -> None:
        ...


def tensors_in(state: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a state dict's nested dicts, lists and tuples."""
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, Mapping):
        for value in state.values():
            yield from tensors_in(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from tensors_in(value)


def written_bytes(tensor: torch.Tensor, rank: int) -> int:
    """Bytes of `tensor` that this rank writes into a DCP checkpoint: its shard of a sharded (FSDP2)
    tensor; all of a replicated one on rank 0 and none elsewhere (DCP writes one copy of those)."""
    if isinstance(tensor, DTensor):
        local = tensor.to_local()
        return local.numel() * local.element_size()
    return tensor.numel() * tensor.element_size() if rank == 0 else 0


def state_bytes(param_groups: list[dict[str, Any]], extra: Mapping[str, Stateful], rank: int) -> int:
    """This rank's share of the bytes a checkpoint takes, at least: Backend.save writes each parameter
    with AdamW's two moments (exp_avg, exp_avg_sq: build_optimizer), the EMA copy of the "model" group,
    and the tensors of the `extra` states. A lower bound (no file framing), so a save is refused only
    where it surely cannot fit."""
    copies = {"model": 4}  # weights, EMA, two moments; other groups (ANT-UW's log-variances) have no EMA
    params = sum(copies.get(group.get("name"), 3) * written_bytes(p, rank)
                 for group in param_groups for p in group["params"])
    return params + sum(written_bytes(t, rank) for obj in extra.values() for t in tensors_in(obj.state_dict()))


def _finish_write(save: Future, partial: Path, hash_here: bool) -> dict[str, str]:
    """Wait for a background save, then hash its files (rank 0), off the training thread."""
    save.result()
    return digest_files(partial) if hash_here else {}


class CheckpointManager:
    """Saves through a backend (asynchronously where it can) and commits complete checkpoints.

    What a checkpoint holds besides the backend's model, EMA and optimizer is registered
    with it as named stateful objects (`state_dict()` / `load_state_dict()`): plain values
    (data position, counters) go into meta.json under their name; tensors (the post-hoc
    EMA) are written by the backend beside the model, resharded like it on load.
    """

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, backend: StateFiles, world: World, *,
                 last_step: int | None = None, keep_steps: Collection[int] = (),
                 on_commit: Callable[[Path, int], None] | None = None,
                 before_commit: Callable[[int], None] | None = None):
        self.root = checkpoint_dir(run_dir)
        self.on_commit = on_commit  # rank 0, after a checkpoint is complete: (its directory, its step)
        # called with the step before a checkpoint is written, so what it writes (the post-hoc EMA
        # snapshots) is on disk before the checkpoint a resume would start from commits
        self.before_commit = before_commit
        self.last_step = last_step  # the run's final step: always saved
        self.keep_steps = frozenset(keep_steps)  # kept whatever the retention policy says (eval.milestones)
        self.cfg = cfg
        self.backend = backend
        self.world = world
        self.meta_states: dict[str, Stateful] = {}  # in meta.json, under their names
        self.tensor_states: dict[str, Stateful] = {}  # in the backend's files, under their names
        self.run_facts: dict[str, Any] = {}  # the same in every checkpoint of this process (world size, config)
        self.pending: tuple[Future, int, Path] | None = None
        self.on_disk_step: int | None = None  # the step this manager last saved or loaded
        self.blocked_seconds = 0.0  # time the training loop spent inside save(), for the step breakdown
        self._state_bytes: int | None = None  # what a checkpoint of this run takes at least (state_bytes)
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-hash")
        if world.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    def register(self, name: str, obj: Stateful, *, tensors: bool = False) -> None:
        """Save `obj.state_dict()` under `name` in every checkpoint and load it back on resume:
        in meta.json (JSON values), or with `tensors` through the backend's files."""
        taken = {"step", *self.meta_states, *self.tensor_states, *self.run_facts}
        if name in taken:
            raise ValueError(f"checkpoint state name {name!r} is taken ({', '.join(sorted(taken))} are); "
                             f"register each state once, under a name of its own")
        (self.tensor_states if tensors else self.meta_states)[name] = obj

    def describe_run(self, **facts: Any) -> None:
        """Facts about the run written into each meta.json as they are (world size, backend, config)."""
        self.run_facts.update(facts)

    def due(self, step: int) -> bool:
        """Whether training saves after `step`: every `checkpoint.every` steps, and at the run's last."""
        return step % self.cfg.every == 0 or step == self.last_step

    def meta(self, step: int) -> dict[str, Any]:
        """meta.json of a checkpoint at `step`: the step, each registered plain state, the run's facts."""
        return {"step": step, **{name: obj.state_dict() for name, obj in self.meta_states.items()}, **self.run_facts}

    def save(self, step: int, *, last: bool = False) -> bool:
        """Save after `step` if a save is due, or always with `last` (the process stops after it: a
        stop request, or the end), then synchronously. Whether it saved."""
        last = last or step == self.last_step
        if not (last or self.due(step)):
            return False
        if self.before_commit is not None:
            self.before_commit(step)
        start = time.perf_counter()
        self.wait()
        # A stop right after a scheduled save, or right after resuming, asks for the same state
        # again; rewriting it would delete the complete copy before the new one is renamed in.
        if step != self.on_disk_step:
            self._require_space(step)
            self._write(step, self.meta(step), asynchronous=self.cfg.async_save and not last)
            self.on_disk_step = step
        self.blocked_seconds += time.perf_counter() - start
        return True

    def _write(self, step: int, meta: dict[str, Any], asynchronous: bool) -> None:
        partial = self.root / f"{checkpoint_name(step)}.partial"
        with self._disk_full_named(step, partial):
            if self.world.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)  # a crashed earlier attempt at this step
                partial.mkdir(parents=True)
                atomic_write_json(partial / META, meta)
            self._barrier()
            future = self.backend.save(partial, extra=self.tensor_states, asynchronous=asynchronous)
            if future is None:
                self._barrier()
                self._commit(step, partial, digest_files(partial) if self.world.rank == 0 else {})
            else:
                self.pending = (self._hasher.submit(_finish_write, future, partial, self.world.rank == 0), step,
                                partial)

    def _disk_full_advice(self) -> str:
        entries = read_manifest(self.root.parent)
        kept = (f"the latest complete checkpoint, {entries[-1]['name']}, is untouched and the run resumes from it"
                if entries else "no checkpoint of this run is complete yet")
        return (f"Free space there (or move the run to a larger filesystem), or keep fewer checkpoints "
                f"(checkpoint.keep_last={self.cfg.keep_last}, checkpoint.keep_every={self.cfg.keep_every}); {kept}.")

    def _require_space(self, step: int) -> None:
        """Refuse to start checkpoint `step` where its filesystem cannot hold one as big as the
        newest complete one, or as the state about to be written (the first save of a run has no
        newest to go by); rank 0 checks, and every rank raises the same error."""
        if self._state_bytes is None:  # the same at every save: summed over the ranks once
            share = state_bytes(self.backend.param_groups, self.tensor_states, self.world.rank)
            shares = [share]
            if self.world.size > 1:
                shares = [0] * self.world.size
                dist.all_gather_object(shares, share)
            self._state_bytes = sum(shares)
        message = None
        if self.world.rank == 0:
            needed = max(newest_checkpoint_bytes(self.root.parent), self._state_bytes)
            try:
                require_free_space(self.root / f"{checkpoint_name(step)}.partial", needed, f"checkpoint step {step}",
                                   self._disk_full_advice())
            except DiskFullError as err:
                message = str(err)
        if self.world.size > 1:
            shared = [message]
            dist.broadcast_object_list(shared, src=0)
            message = shared[0]
        if message is not None:
            raise DiskFullError(message)

    @contextlib.contextmanager
    def _disk_full_named(self, step: int, partial: Path) -> Iterator[None]:
        """A save of checkpoint `step` that fails for want of space (ENOSPC anywhere in the error,
        or DCP's "unexpected pos" from torch.save with less free than a checkpoint takes) raises
        DiskFullError naming it; its partial directory goes, to give the space back."""
        try:
            yield
        except (Exception, CheckpointException) as err:
            needed = newest_checkpoint_bytes(self.root.parent)
            if not (is_disk_full(err) or free_bytes(self.root) < needed):
                raise
            named = disk_full_error(partial, f"checkpoint step {step}", needed or None, self._disk_full_advice())
            if self.world.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise named from err

    def poll(self) -> None:
        """Commit a finished background save (cheap; call every step)."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        if self.pending is None:
            return
        future, step, partial = self.pending
        self.pending = None
        with self._disk_full_named(step, partial):
            digests = future.result()
            # DCP's rank 0 finishes only after every rank's data is written: it may commit alone.
            self._commit(step, partial, digests)

    def finish(self) -> None:
        """On the way out, even after an error: commit a background save still in flight, so a
        checkpoint that was being written when training stopped is not left as `.partial`."""
        try:
            self.wait()
        except (Exception, CheckpointException) as err:  # the save itself failed: nothing to commit
            log.error("the checkpoint being written when training stopped could not be completed: %s", err)
        finally:
            self._hasher.shutdown(wait=False)

    def _commit(self, step: int, partial: Path, digests: dict[str, str]) -> None:
        if self.world.rank != 0:
            return
        final = self.root / checkpoint_name(step)
        files = {name: (partial / name).stat().st_size for name in digests}
        entries = [e for e in read_manifest(self.root.parent) if e["step"] != step]
        entries.append({"step": step, "name": final.name, "files": files, "sha256": digests, "time": time.time()})
        entries.sort(key=lambda e: e["step"])
        steps = [e["step"] for e in entries]
        keep = retained(steps, self.cfg.keep_last, self.cfg.keep_every) | self.keep_steps.intersection(steps)
        # the manifest first, then the rename: a crash between them leaves an entry whose directory
        # is missing or still the old one (reported and passed over), never a directory without an entry
        atomic_write_json(self.root / MANIFEST, {"checkpoints": [e for e in entries if e["step"] in keep]})
        shutil.rmtree(final, ignore_errors=True)
        partial.replace(final)
        fsync_dir(self.root)
        for e in entries:
            if e["step"] not in keep:
                shutil.rmtree(self.root / e["name"], ignore_errors=True)
        log.info("checkpoint %s complete", final)
        if self.on_commit is not None:
            self.on_commit(final, step)

    def load_latest(self) -> dict[str, Any] | None:
        """Load the newest checkpoint whose files match their manifest hashes into the backend;
        its meta, or None for a fresh run. Rank 0 checks the files and tells the others which.
        A manifest none of whose checkpoints is usable is a CheckpointError, not a fresh start."""
        path, error = None, None
        if self.world.rank == 0:
            try:
                path = self._choose_latest()
            except CheckpointError as err:
                error = err
        if self.world.size > 1:
            chosen = [None if path is None else str(path), None if error is None else str(error)]
            dist.broadcast_object_list(chosen, src=0)
            if chosen[1] is not None and error is None:
                error = CheckpointError(chosen[1])
            path = None if chosen[0] is None else Path(chosen[0])
        if error is not None:
            raise error
        return None if path is None else self.load(path, verified=True)

    def _choose_latest(self) -> Path | None:
        roll_forward(self.root.parent)
        checked = checked_checkpoints(self.root.parent, contents=True)
        for _, path, problem in reversed(checked):
            if problem is None:
                return path
            log.warning("skipping checkpoint %s: %s", path, problem)
        if checked:
            problems = "; ".join(problem for _, _, problem in checked)
            raise CheckpointError(f"none of the checkpoints in {self.root / MANIFEST} is usable ({problems}); "
                                  f"starting from step 0 would overwrite them: restore them, or move {self.root} "
                                  f"aside to start the run afresh")
        return None

    def load(self, path: Path, *, verified: bool = False) -> dict[str, Any]:
        """Load checkpoint `path` into the backend and the registered states after checking its
        files against the manifest (unless `verified` already); its meta."""
        if not verified:
            require_complete(path)
        try:
            self.backend.load(path, extra=self.tensor_states)
        except CheckpointError:
            raise
        # DCP's CheckpointException derives from BaseException, so `except Exception` alone let
        # an unreadable DCP checkpoint escape as a bare "CheckpointException ranks:dict_keys([0])"
        except (Exception, CheckpointException) as err:
            raise CheckpointError(f"checkpoint {path} could not be loaded ({type(err).__name__}: {err}); "
                                  f"move it aside to resume from the one before") from err
        meta = read_meta(path)
        for name, obj in self.meta_states.items():
            if name not in meta:
                raise CheckpointError(f"{path / META} has no {name!r} (it has {sorted(meta)}); it was not written "
                                      f"by this trainer: move {path} aside to resume from the one before")
            obj.load_state_dict(meta[name])
        self.on_disk_step = meta["step"]
        return meta

    def _barrier(self) -> None:
        if self.world.size > 1:
            dist.barrier()


# --- a complete checkpoint and its meta --------------------------------------------------

def run_dir_of(checkpoint: str | Path) -> Path:
    """RUN_DIR of RUN_DIR/checkpoints/step_N."""
    return Path(checkpoint).resolve().parent.parent


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint and its meta.json, read once."""

    path: Path
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def run_dir(self) -> Path:
        return run_dir_of(self.path)

    @cached_property
    def config(self) -> TrainConfig:
        """The config the run was trained with."""
        return to_train_config(without_retired_keys(self.meta["config"]))


def open_checkpoint(path: str | Path, *, verify: bool = True) -> CheckpointInfo:
    """Checkpoint `path` with its meta, after checking its files against the run's manifest
    (`verify`; a caller that reads no weights may skip the hashing)."""
    path = Path(path)
    if verify:
        require_complete(path)
    return CheckpointInfo(path, read_meta(path))

