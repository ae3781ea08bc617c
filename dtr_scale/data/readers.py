"""Random access to the stored samples of a prepared dataset, a batch of global sample positions at a time.

Both formats are read by position so that one sampler (order.py) decides the order for both. MDS shards are
found through streaming's index (`LocalDataset`: which shards, how many samples, which columns at which
offsets); a sample's bytes are then read by position, through the byte range the shard's own header gives
(streaming's reader opens the file and reads each sample alone, which costs a cached sample twice over).
Webdataset tars are read through the per-shard offset index written beside each tar at prep time
(`build_tar_index`).
A batch is read in three passes (`read_extents`): where each sample lies (an 8-byte header or index row),
a WILLNEED hint for every sample (open_files.py: the disk queues the whole batch's reads at once), then the
reads into one buffer, each checked against the hash prep stored for it. Files stay open per reader
(OpenFiles); readers are built in each DataLoader worker, and a descriptor a fork shares is harmless (pread).
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
from dtr_scale.data.open_files import OpenFiles
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


def locate(starts: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard, sample index in it) of each global position; `starts`: each shard's first position, then the
    total."""
    shards = np.searchsorted(starts, positions, side="right") - 1
    return shards, positions - starts[shards]


def read_extents(files: OpenFiles, checks: ShardChecks, paths: list[str], shards: np.ndarray,
                 indexes: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """uint8 [B, max size]: row j holds the `sizes[j]` bytes at `offsets[j]` of shard `shards[j]` (sample
    `indexes[j]` of it, global `positions[j]`), checked against its stored hash (ShardDataError naming the
    shard and sample otherwise)."""
    for shard, offset, size in zip(shards.tolist(), offsets.tolist(), sizes.tolist()):
        if size:  # (0 would mean "to the end of the file")
            files.will_need(paths[shard], offset, size)
    buffer = np.empty((len(shards), int(sizes.max(initial=0))), np.uint8)
    for j, (shard, offset, size) in enumerate(zip(shards.tolist(), offsets.tolist(), sizes.tolist())):
        row = memoryview(buffer[j, :size])
        got = files.read_into(paths[shard], row, offset)
        checks.check(int(shard), int(indexes[j]), row[:got], int(positions[j]))
    return buffer


class MDSReader:
    def __init__(self, root: str, manifest: dict, fetch: Fetcher | None = None,
                 marked: dict[str, dict] | None = None) -> None:
        from streaming import LocalDataset  # heavy import, only where MDS is read

        try:
            dataset = LocalDataset(local=root)
        except (ValueError, KeyError, TypeError) as err:  # a damaged index.json (JSONDecodeError is a ValueError)
            raise ShardDataError(f"{os.path.join(root, 'index.json')} cannot be read ({type(err).__name__}: {err}); "
                                 f"rerun `dtr-prep merge {root}` to rewrite it") from err
        entries = {shard["path"]: shard for shard in manifest["shards"]}
        unknown = [s.raw_data.basename for s in dataset.shards if s.raw_data.basename not in entries]
        if unknown:
            raise ShardDataError(f"{os.path.join(root, 'index.json')} lists shards that manifest.json does not "
                                 f"({', '.join(unknown[:3])}); the two belong to different datasets, rerun "
                                 f"`dtr-prep merge {root}`")
        in_index_order = {"shards": [entries[s.raw_data.basename] for s in dataset.shards]}
        self._files = OpenFiles()
        self._bytes = np.array([s.raw_data.bytes for s in dataset.shards], dtype=np.int64)
        self._checks = ShardChecks(root, in_index_order, self._bytes.tolist(), self._files, fetch, marked)
        self._paths = [os.path.join(root, s.raw_data.basename) for s in dataset.shards]
        self._starts = np.concatenate([[0], np.cumsum([s.samples for s in dataset.shards])]).astype(np.int64)
        self._dtype = np.dtype(manifest["dtype"])
        self._shape = tuple(manifest["stored_shape"])
        self._moments_bytes = self._dtype.itemsize * int(np.prod(self._shape))
        layouts = {tuple(fixed_column_offsets(s.column_names, s.column_sizes).items()) for s in dataset.shards}
        self._columns = dict(layouts.pop()) if len(layouts) == 1 else {}
        if {"label", "moments"} - set(self._columns) or any(s.compression for s in dataset.shards):
            raise ShardDataError(f"{root}: the MDS shards lack uncompressed fixed-size label and moments columns "
                                 "in one layout; they were not written by dtr-prep, prepare the data again")
        _check_count(root, int(self._starts[-1]), manifest)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read_batch(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(moments [B, 2, 2C, h, w], labels int64 [B]) of the samples at these global positions; the moments
        are a view of the bytes read."""
        shards, indexes = locate(self._starts, positions)
        for shard, first in zip(*np.unique(shards, return_index=True)):
            self._checks.ready(int(shard), int(positions[first]))
        # An MDS shard begins with uint32 [samples, offset of sample 0, ..., end of the last sample].
        pairs = b"".join(self._files.pread(self._paths[s], 8, 4 * (1 + i)).ljust(8, b"\0")
                         for s, i in zip(shards.tolist(), indexes.tolist()))
        bounds = np.frombuffer(pairs, np.uint32).reshape(-1, 2).astype(np.int64)
        sizes = bounds[:, 1] - bounds[:, 0]
        # A header damaged after its shard was verified: read nothing, the hash check below names it.
        sizes[(sizes < 0) | (bounds[:, 1] > self._bytes[shards])] = 0
        data = read_extents(self._files, self._checks, self._paths, shards, indexes, bounds[:, 0], sizes, positions)
        at = self._columns["moments"]
        moments = data[:, at:at + self._moments_bytes].view(self._dtype).reshape(len(positions), *self._shape)
        at = self._columns["label"]
        return moments, data[:, at:at + 8].view(np.int64)[:, 0].copy()


class TarReader:
    def __init__(self, root: str, manifest: dict, fetch: Fetcher | None = None,
                 marked: dict[str, dict] | None = None) -> None:
        self._files = OpenFiles()
        self._checks = ShardChecks(root, manifest, [shard.get("bytes") for shard in manifest["shards"]],
                                   self._files, fetch, marked)
        self._paths = [os.path.join(root, shard["path"]) for shard in manifest["shards"]]
        counts = np.array([shard["samples"] for shard in manifest["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        # on first use: the sidecar's layout (its rows are read one at a time), or an index built from the tar
        self._indexes: dict[int, NpyRows | np.ndarray] = {}
        self._dtype = np.dtype(manifest["dtype"])
        self._shape = tuple(manifest["stored_shape"])
        self._moments_bytes = self._dtype.itemsize * int(np.prod(self._shape))
        _check_count(root, int(self._starts[-1]), manifest)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _ready(self, shard: int, position: int) -> None:
        """Check the shard (and its index file) against the manifest and find its index, on its first read."""
        if shard not in self._indexes:
            self._checks.ready(shard, position)
            path = self._paths[shard]
            sidecar = tar_index_path(path)
            samples = int(self._starts[shard + 1] - self._starts[shard])
            self._indexes[shard] = (npy_rows(sidecar, np.int64, (samples, 3))
                                    if os.path.exists(sidecar) else build_tar_index(path))

    def _index_row(self, shard: int, index: int) -> np.ndarray:
        """(offset, bytes, label) of sample `index` of the shard."""
        rows = self._indexes[shard]
        return read_row(rows, index, self._files) if isinstance(rows, NpyRows) else rows[index]

    def read_batch(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(moments [B, 2, 2C, h, w], labels int64 [B]) of the samples at these global positions; the moments
        are a view of the bytes read."""
        shards, indexes = locate(self._starts, positions)
        for shard, first in zip(*np.unique(shards, return_index=True)):
            self._ready(int(shard), int(positions[first]))
        rows = np.array([self._index_row(s, i) for s, i in zip(shards.tolist(), indexes.tolist())],
                        dtype=np.int64).reshape(-1, 3)
        count = self._moments_bytes
        sizes = np.where(rows[:, 1] == count, count, 0)  # an index damaged after it was verified: checked below
        data = read_extents(self._files, self._checks, self._paths, shards, indexes, rows[:, 0], sizes, positions)
        return data[:, :count].view(self._dtype).reshape(len(positions), *self._shape), rows[:, 2].copy()


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
