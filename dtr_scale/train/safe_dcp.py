"""Reading torch.distributed.checkpoint (DCP) directories without running code from them.

DCP's `.metadata` (a pickle) goes through an unpickler that builds only DCP's own
metadata classes, and the non-tensor values DCP stores are read with
`torch.load(weights_only=True)`. What the keys mean is the business of the backend
that wrote them; this module knows only DCP's file format.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from dtr_scale.train.manifest import CheckpointError

DCP_METADATA = ".metadata"


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that would run code if it were loaded the way torch loads it by default."""


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


def read_dcp_tensors(path: str | Path, prefix: str, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of DCP checkpoint `path` whose key starts with `prefix`, on the CPU, keyed by
    the rest of its key. Reads only those tensors: the others stay on disk. `what` names them
    in an error ("EMA weights")."""
    try:
        tensors = {fqn: torch.empty(entry.size, dtype=entry.properties.dtype)
                   for fqn, entry in read_dcp_metadata(path).state_dict_metadata.items()
                   if fqn.startswith(prefix) and isinstance(entry, TensorStorageMetadata)}
        if not tensors:
            raise CheckpointError(f"it holds no {prefix}* tensors")
        with warnings.catch_warnings():  # DCP's note that it reads without a process group: intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_load(tensors, path)
    except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
        raise CheckpointError(f"could not read the {what} of {path} ({type(err).__name__}: {err})") from err
    return {fqn[len(prefix):]: value for fqn, value in tensors.items()}
