"""Random access to the stored samples of a prepared dataset, by global sample position.

Both formats are read by position so that one sampler (order.py) decides the order for both. MDS goes
through streaming's random-access reader (`LocalDataset` finds a sample's bytes); webdataset tars through
the per-shard offset index written beside each tar at prep time (`build_tar_index`).
Readers open files per read and hold no handles, so they are safe to build before DataLoader workers fork,
and safe to call from the read threads of a worker (loader.py): a shard's first touch takes a lock.
A tar's offset index is read by row, like the per-sample hashes (integrity.read_row): a start at 8 ranks
reads a few samples of each shard, not each shard's whole index.
Integrity (integrity.py): a shard's first read makes sure it was hashed once against manifest.json (a stat
against the shared verified mark, usually), and every sample read is compared with the hash prep stored
for it, so a damaged shard stops training naming the shard and the sample, never feeds it wrong numbers.
A remote dataset's reader fetches each shard's files into the local cache on their first read (`fetch`).
"""

from __future__ import annotations

import os

import numpy as np

from dtr_scale.data.integrity import NpyRows, ShardChecks, npy_rows, read_row
from dtr_scale.data.remote import Fetcher
from dtr_scale.data.shard_format import ShardDataError, build_tar_index, tar_index_path


def fixed_column_offsets(column_names: list[str], column_sizes: list[int | None]) -> dict[str, int]:
    """Byte offset, inside one MDS sample, of each fixed-size column that precedes every variable-size one.

    An MDS sample is [uint32 size of each variable-size column][each column's bytes, in column order]
    (streaming's MDSReader.decode_sample). Our columns sort as index, label, moments, source, so the three
    fixed-size ones sit at constant offsets.
    """
    at = 4 * sum(size is None for size in column_sizes)
    offsets = {}
    for name, size in zip(column_names, column_sizes):
        if size is None:
            break
        offsets[name] = at
        at += size
    return offsets


class MDSReader:
    """streaming's LocalDataset finds and reads a sample's bytes; only moments and label are decoded,
    from their fixed offsets, because streaming's generic decoder (every column, every sample, the column
    encodings re-parsed each time) costs more than the rest of the loader together."""

    def __init__(self, root: str, manifest: dict, fetch: Fetcher | None = None,
                 marked: dict[str, dict] | None = None) -> None:
        from streaming import LocalDataset  # heavy import, only where MDS is read

        try:
            self._dataset = LocalDataset(local=root)
        except (ValueError, KeyError, TypeError) as err:  # a damaged index.json (JSONDecodeError is a ValueError)
            raise ShardDataError(f"{os.path.join(root, 'index.json')} cannot be read ({type(err).__name__}: {err}); "
                                 f"rerun `dtr-prep merge {root}` to rewrite it") from err
        entries = {shard["path"]: shard for shard in manifest["shards"]}
        unknown = [s.raw_data.basename for s in self._dataset.shards if s.raw_data.basename not in entries]
        if unknown:
            raise ShardDataError(f"{os.path.join(root, 'index.json')} lists shards that manifest.json does not "
                                 f"({', '.join(unknown[:3])}); the two belong to different datasets, rerun "
                                 f"`dtr-prep merge {root}`")
        in_index_order = {"shards": [entries[s.raw_data.basename] for s in self._dataset.shards]}
        self._checks = ShardChecks(root, in_index_order, [s.raw_data.bytes for s in self._dataset.shards], fetch,
                                   marked)
        self._dtype = np.dtype(manifest["dtype"])
        self._shape = tuple(manifest["stored_shape"])
        self._count = int(np.prod(self._shape))
        self._offsets = [fixed_column_offsets(s.column_names, s.column_sizes) for s in self._dataset.shards]
        if any({"label", "moments"} - set(o) for o in self._offsets):
            raise ShardDataError(f"{root}: the MDS shards lack fixed-size label and moments columns; "
                                 "they were not written by dtr-prep, prepare the data again")
        _check_count(root, len(self._dataset), manifest)

    def __len__(self) -> int:
        return len(self._dataset)

    def ready(self, positions: list[int]) -> None:
        """First reads of the shards these samples are in (see loader.load_batch), before reading them."""
        for position in positions:
            self._checks.ready(self._dataset.spanner[position][0], position)

    def read(self, position: int) -> tuple[np.ndarray, int]:
        """(moments [2, 2C, h, w], label) of the sample at this global position."""
        shard, index = self._dataset.spanner[position]
        self._checks.ready(shard, position)
        try:
            data = self._dataset.shards[shard].get_sample_data(index)
        except (IndexError, ValueError):  # the shard was cut short after it was verified: named below
            data = b""
        self._checks.check(shard, index, data, position)
        offsets = self._offsets[shard]
        moments = np.frombuffer(data, self._dtype, self._count, offsets["moments"]).reshape(self._shape)
        return moments, int(np.frombuffer(data, np.int64, 1, offsets["label"])[0])


class TarReader:
    def __init__(self, root: str, manifest: dict, fetch: Fetcher | None = None,
                 marked: dict[str, dict] | None = None) -> None:
        self._checks = ShardChecks(root, manifest, [shard.get("bytes") for shard in manifest["shards"]], fetch,
                                   marked)
        self._paths = [os.path.join(root, shard["path"]) for shard in manifest["shards"]]
        counts = np.array([shard["samples"] for shard in manifest["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        # on first use: the sidecar's layout (its rows are read one at a time), or an index built from the tar
        self._indexes: dict[int, NpyRows | np.ndarray] = {}
        self._dtype = np.dtype(manifest["dtype"])
        self._shape = tuple(manifest["stored_shape"])
        _check_count(root, int(self._starts[-1]), manifest)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard(self, position: int) -> int:
        return int(np.searchsorted(self._starts, position, side="right")) - 1

    def _ready(self, shard: int, position: int) -> None:
        """Check the shard (and its index file) against the manifest and find its index, on its first read."""
        if shard not in self._indexes:
            self._checks.ready(shard, position)
            path = self._paths[shard]
            sidecar = tar_index_path(path)
            samples = int(self._starts[shard + 1] - self._starts[shard])
            self._indexes[shard] = (npy_rows(sidecar, np.int64, (samples, 3))
                                    if os.path.exists(sidecar) else build_tar_index(path))

    def ready(self, positions: list[int]) -> None:
        """First reads of the shards these samples are in (see loader.load_batch), before reading them."""
        for position in positions:
            self._ready(self._shard(position), position)

    def _index_row(self, shard: int, index: int, position: int) -> np.ndarray:
        """(offset, bytes, label) of sample `index` of the shard."""
        self._ready(shard, position)
        rows = self._indexes[shard]
        return read_row(rows, index) if isinstance(rows, NpyRows) else rows[index]

    def read(self, position: int) -> tuple[np.ndarray, int]:
        """(moments [2, 2C, h, w], label) of the sample at this global position."""
        shard = self._shard(position)
        offset, nbytes, label = self._index_row(shard, position - int(self._starts[shard]), position)
        with open(self._paths[shard], "rb", buffering=0) as f:
            f.seek(int(offset))
            data = f.read(int(nbytes))
        self._checks.check(shard, position - int(self._starts[shard]), data, position)
        return np.frombuffer(data, self._dtype).reshape(self._shape), int(label)


def _check_count(root: str, found: int, manifest: dict) -> None:
    if found != manifest["num_samples"]:
        raise ShardDataError(f"{root}: the shards hold {found} samples but manifest.json says "
                             f"{manifest['num_samples']}; the dataset is damaged or half-merged, rerun "
                             f"`dtr-prep merge {root}`")


def open_reader(root: str, manifest: dict, fetch: Fetcher | None = None,
                marked: dict[str, dict] | None = None) -> MDSReader | TarReader:
    """The reader of a prepared dataset; `fetch(relpath)` brings a remote dataset's file into `root` first;
    `marked`: the verified mark, if the caller has it (integrity.ShardChecks)."""
    return (MDSReader if manifest["format"] == "mds" else TarReader)(root, manifest, fetch, marked)
