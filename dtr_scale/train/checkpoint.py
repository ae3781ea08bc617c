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

Nothing read from a checkpoint runs code: DCP's `.metadata` (a pickle) goes
through an unpickler that builds only DCP's own metadata classes, and the
non-tensor values DCP stores are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import io
import logging
import pickle
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.stateful import Stateful

from dtr_scale.config import CheckpointConfig, TrainConfig, to_train_config
from dtr_scale.io import atomic_write_json, fsync_dir
from dtr_scale.train.backends import Backend
from dtr_scale.train.manifest import (  # noqa: F401  (re-exported: the checkpoint API in one place)
    MANIFEST, META, CheckpointError, checked_checkpoints, checkpoint_dir, checkpoint_name, complete_checkpoints,
    digest_files, file_digest, latest_checkpoint, read_manifest, read_meta, require_complete, retained, roll_forward,
    verify_checkpoint,
)
from dtr_scale.world import World

DCP_METADATA = ".metadata"
log = logging.getLogger(__name__)


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that would run code if it were loaded the way torch loads it by default."""


# --- reading DCP checkpoints without running code from them -----------------------------

# What a `.metadata` pickle written by torch.distributed.checkpoint names: its dataclasses,
# torch.Size, dtypes and layouts, and the checkpoint id (a path). Anything else is refused.
_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "MetadataIndex", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _DCP_METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"refusing to load {self.source}: it names {module}.{name}, which DCP checkpoint metadata never "
            f"holds (a crafted or foreign file; unpickling it could run code). Delete this checkpoint, or "
            f"re-save it with dtr-scale")


def read_dcp_metadata(path: str | Path) -> Metadata:
    """The DCP metadata of checkpoint directory `path`, unpickled with an allow-list of DCP's classes."""
    source = Path(path) / DCP_METADATA
    try:
        with open(source, "rb") as f:
            metadata = _DCPMetadataUnpickler(f, source).load()
    except FileNotFoundError as err:
        raise CheckpointError(f"{source} does not exist: {path} is not a complete DCP checkpoint") from err
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # a damaged pickle raises any of several types
        raise CheckpointError(f"{source} is not readable DCP metadata ({type(err).__name__}: {err}); "
                              f"the checkpoint is damaged: use an earlier one") from err
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"refusing to load {source}: it holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with its metadata read through `read_dcp_metadata` instead of `pickle.load`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with its non-tensor values (step counts, lr, names) read with weights_only=True."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(f"refusing to load the value {read_item.dest_index.fqn!r} of a DCP checkpoint: "
                                        f"it is not plain data ({err})") from err
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def dcp_load(state: dict[str, Any], path: str | Path, **kwargs: Any) -> None:
    """dcp.load(state) from checkpoint directory `path`, without running code from its files.

    The metadata is checked first, so a crafted file is refused with UnsafeCheckpointError
    naming it rather than a DCP CheckpointException that wraps it."""
    read_dcp_metadata(path)
    dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(), **kwargs)


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

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig, backend: Backend, world: World,
                 on_commit: Callable[[Path, int], None] | None = None):
        self.root = checkpoint_dir(run_dir)
        self.on_commit = on_commit  # rank 0, after a checkpoint is complete: (its directory, its step)
        self.cfg = cfg
        self.backend = backend
        self.world = world
        self.meta_states: dict[str, Stateful] = {}  # in meta.json, under their names
        self.tensor_states: dict[str, Stateful] = {}  # in the backend's files, under their names
        self.run_facts: dict[str, Any] = {}  # the same in every checkpoint of this process (world size, config)
        self.pending: tuple[Future, int, Path] | None = None
        self.on_disk_step: int | None = None  # the step this manager last saved or loaded
        self.blocked_seconds = 0.0  # time the training loop spent inside save(), for the step breakdown
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

    def due(self, step: int, *, last_step: int) -> bool:
        """Whether training saves after `step`: every `checkpoint.every` steps, and at the last step."""
        return step % self.cfg.every == 0 or step == last_step

    def meta(self, step: int) -> dict[str, Any]:
        """meta.json of a checkpoint at `step`: the step, each registered plain state, the run's facts."""
        return {"step": step, **{name: obj.state_dict() for name, obj in self.meta_states.items()}, **self.run_facts}

    def save(self, step: int, *, asynchronous: bool | None = None) -> None:
        start = time.perf_counter()
        self.wait()
        # A stop right after a scheduled save, or right after resuming, asks for the same state
        # again; rewriting it would delete the complete copy before the new one is renamed in.
        if step != self.on_disk_step:
            self._write(step, self.meta(step), asynchronous)
            self.on_disk_step = step
        self.blocked_seconds += time.perf_counter() - start

    def _write(self, step: int, meta: dict[str, Any], asynchronous: bool | None) -> None:
        partial = self.root / f"{checkpoint_name(step)}.partial"
        if self.world.rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # a crashed earlier attempt at this step
            partial.mkdir(parents=True)
            atomic_write_json(partial / META, meta)
        self._barrier()
        use_async = self.cfg.async_save if asynchronous is None else asynchronous
        future = self.backend.save(partial, extra=self.tensor_states, asynchronous=use_async)
        if future is None:
            self._barrier()
            self._commit(step, partial, digest_files(partial) if self.world.rank == 0 else {})
        else:
            self.pending = (self._hasher.submit(_finish_write, future, partial, self.world.rank == 0), step, partial)

    def poll(self) -> None:
        """Commit a finished background save (cheap; call every step)."""
        if self.pending is not None and self.pending[0].done():
            self.wait()

    def wait(self) -> None:
        if self.pending is None:
            return
        future, step, partial = self.pending
        self.pending = None
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
        keep = retained([e["step"] for e in entries], self.cfg.keep_last, self.cfg.keep_every)
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


# --- reading a checkpoint's weights: the one place that knows which keys hold them ---------

EMA_EXPORT = "ema.safetensors"  # the EMA beside a checkpoint whose files DCP cannot read (DeepSpeed's)
WEIGHTS = ("ema", "raw")  # the trainer's per-step EMA; the optimizer's weights
_DCP_PREFIX = {"ema": "ema.", "raw": "module.model."}  # the backends' DCP keys: {"ema"}, {"module": {"model.*"}}


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
        return to_train_config(self.meta["config"])


def open_checkpoint(path: str | Path, *, verify: bool = True) -> CheckpointInfo:
    """Checkpoint `path` with its meta, after checking its files against the run's manifest
    (`verify`; a caller that reads no weights may skip the hashing)."""
    path = Path(path)
    if verify:
        require_complete(path)
    return CheckpointInfo(path, read_meta(path))


def read_weights(path: str | Path, which: str) -> dict[str, torch.Tensor]:
    """The whole model weights `which` ("ema" or "raw") of checkpoint `path`, on the CPU, under
    the official DiT names. Reads only those tensors: the optimizer and the other copy stay on
    disk. The caller checks the checkpoint first (open_checkpoint, require_complete)."""
    path = Path(path)
    if which not in WEIGHTS:
        raise ValueError(f"weights {which!r} are not one of {', '.join(WEIGHTS)}")
    if which == "ema" and (path / EMA_EXPORT).exists():
        from safetensors.torch import load_file

        return load_file(str(path / EMA_EXPORT))
    what = "EMA" if which == "ema" else "model"
    try:
        prefix = _DCP_PREFIX[which]
        weights = {fqn[len(prefix):]: torch.empty(entry.size, dtype=entry.properties.dtype)
                   for fqn, entry in read_dcp_metadata(path).state_dict_metadata.items()
                   if fqn.startswith(prefix) and isinstance(entry, TensorStorageMetadata)}
        if not weights:
            raise CheckpointError(f"it holds no {prefix}* tensors")
        request = {"ema": weights} if which == "ema" else {"module": {f"model.{k}": v for k, v in weights.items()}}
        with warnings.catch_warnings():  # DCP's note that it reads without a process group: intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load(request, path)
    except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
        raise CheckpointError(f"could not read the {what} weights of {path} ({type(err).__name__}: {err})") from err
    if which == "raw":
        weights = {k[len("model."):]: v for k, v in request["module"].items()}
    return weights
