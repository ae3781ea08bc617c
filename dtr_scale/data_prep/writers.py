"""Write one chunk's samples as MDS (streaming.MDSWriter) or webdataset (webdataset.TarWriter) shards.

Both writers are byte-deterministic for the same samples (the tar's mtime is fixed), so a chunk redone after
an interruption is identical to one that never was.
"""

from __future__ import annotations

import os

import numpy as np

from dtr_scale.data.integrity import sample_hash_path, sample_hashes
from dtr_scale.data.shard_format import (TAR_LABEL, TAR_MOMENTS, TAR_SOURCE, TAR_SHARD_NAME, build_tar_index,
                                         mds_columns, tar_index_path, tar_sample_key)
from dtr_scale.extras import import_extra
from dtr_scale.io import read_json

MDS_SIZE_LIMIT = 1 << 28  # bytes per .mds file; a 1024-image chunk of 256 px latents is ~32 MiB


def write_mds_sample_hashes(directory: str) -> None:
    """`<shard>.xxh3.npy` beside each MDS shard of a chunk, hashed as the loader's reader reads the samples
    (streaming's get_sample_data)."""
    from streaming import LocalDataset

    for shard in LocalDataset(local=directory).shards:
        np.save(sample_hash_path(os.path.join(directory, shard.raw_data.basename)),
                sample_hashes(shard.get_sample_data(i) for i in range(shard.samples)))


def write_tar_sample_hashes(tar_path: str, index: np.ndarray) -> None:
    """`shard.tar.xxh3.npy`: the hash of each sample's moments bytes, as located by the tar's offset index."""
    with open(tar_path, "rb") as f:
        np.save(sample_hash_path(tar_path), sample_hashes(os.pread(f.fileno(), int(n), int(at)) for at, n, _ in index))


class MDSChunkWriter:
    def __init__(self, directory: str, stored_shape: tuple[int, ...], dtype: str) -> None:
        from streaming import MDSWriter

        self._directory = directory
        self._writer = MDSWriter(out=directory, columns=mds_columns(stored_shape, dtype), size_limit=MDS_SIZE_LIMIT)

    def write(self, moments: np.ndarray, label: int, index: int, source: str) -> None:
        self._writer.write({"moments": moments, "label": label, "index": index, "source": source})

    def close(self) -> list[dict]:
        """Finish the chunk and write each shard's per-sample hashes beside it; [{"path", "samples"}]."""
        self._writer.finish()
        index = read_json(os.path.join(self._directory, "index.json"))
        write_mds_sample_hashes(self._directory)
        return [{"path": s["raw_data"]["basename"], "samples": s["samples"]} for s in index["shards"]]


class TarChunkWriter:
    def __init__(self, directory: str, stored_shape: tuple[int, ...], dtype: str) -> None:
        TarWriter = import_extra("webdataset").TarWriter

        os.makedirs(directory, exist_ok=True)
        self._path = os.path.join(directory, TAR_SHARD_NAME)
        self._writer = TarWriter(self._path, mtime=0.0)
        self._samples = 0

    def write(self, moments: np.ndarray, label: int, index: int, source: str) -> None:
        self._writer.write({"__key__": tar_sample_key(index), TAR_MOMENTS: moments, TAR_LABEL: label,
                            TAR_SOURCE: source})
        self._samples += 1

    def close(self) -> list[dict]:
        """Finish the chunk and write the tar's offset index beside it; [{"path", "samples"}]."""
        self._writer.close()
        index = build_tar_index(self._path)
        np.save(tar_index_path(self._path), index)
        write_tar_sample_hashes(self._path, index)
        return [{"path": TAR_SHARD_NAME, "samples": self._samples}]


def open_chunk_writer(fmt: str, directory: str, stored_shape: tuple[int, ...], dtype: str) -> MDSChunkWriter | TarChunkWriter:
    writer = MDSChunkWriter if fmt == "mds" else TarChunkWriter
    return writer(directory, stored_shape, dtype)
