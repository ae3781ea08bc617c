"""The shard files one reader reads, opened once and kept open, read by position, with the kernel told how.

A cached sample costs a loader a few microseconds to read; opening and closing its file per read cost twice
that. So a reader keeps each file's descriptor (up to a quarter of the process's open-file limit, least
recently used closed first) and reads with pread, which never moves a file position: threads and forked
DataLoader workers may share a descriptor. Two hints (posix_fadvise) shape the disk traffic where the shards
exceed the page cache:
- RANDOM, once per file: no read-ahead; a sample is read alone, so read-ahead only fetched bytes nobody asked
  for (about a fifth more disk bytes per sample, measured) and evicted cached samples to hold them;
- WILLNEED, per sample, for a whole batch before its first read: the kernel queues every sample's read at
  once, so the disk works on a batch's reads together while the loader copies and checks the first ones,
  instead of one read at a time per loader worker.
"""

from __future__ import annotations

import os
import resource
import weakref
from collections import OrderedDict

MAX_OPEN = 4096  # at ImageNet scale a reader reads 1,252 shards and their 1,252 per-sample hash files


def open_capacity() -> int:
    """How many descriptors one reader keeps: a quarter of the soft open-file limit (torch's shared-memory
    batches and the rest of the process keep the other three), at most MAX_OPEN, at least 8."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return MAX_OPEN if soft == resource.RLIM_INFINITY else max(8, min(MAX_OPEN, soft // 4))


def _close_all(fds: OrderedDict[str, int]) -> None:
    while fds:
        os.close(fds.popitem()[1])


class OpenFiles:
    """Read-only descriptors by path, opened on first use with read-ahead off, closed when dropped."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = open_capacity() if capacity is None else capacity
        self._fds: OrderedDict[str, int] = OrderedDict()
        weakref.finalize(self, _close_all, self._fds)

    def fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            self._fds.move_to_end(path)
            return fd
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._fds[path] = fd
        if len(self._fds) > self.capacity:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def pread(self, path: str, size: int, offset: int) -> bytes:
        return os.pread(self.fd(path), size, offset)

    def read_into(self, path: str, buffer: memoryview, offset: int) -> int:
        """Bytes read into `buffer` from `offset`: its length, or fewer where the file ends first."""
        return os.preadv(self.fd(path), [buffer], offset)

    def will_need(self, path: str, offset: int, size: int) -> None:
        os.posix_fadvise(self.fd(path), offset, size, os.POSIX_FADV_WILLNEED)
