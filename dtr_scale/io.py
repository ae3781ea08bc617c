"""Small file writes that survive a killed writer, shared by training, evaluation and prep.

- `atomic_write_*`: write `.NAME.tmp-PID` beside the target, fsync it, rename it over the
  target, fsync the directory. A reader sees the old file or the new one, never half of one.
- `append_jsonl`: one record per line, one write per record (O_APPEND: concurrent writers
  do not interleave); a line torn by a killed writer is closed before the next record.
- `read_jsonl`: the records, skipping a torn line; `read_json`: a JSON file or an error
  naming it.
- `require_free_space` / `disk_full_error`: a write the filesystem has no room for, before it
  starts or as it fails, as one DiskFullError naming the filesystem, the bytes and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)


class CorruptFileError(ValueError):
    """A project file that exists but cannot be parsed; the message names it."""


class DiskFullError(OSError):
    """A write the filesystem has no room for; the message names the filesystem (its mount
    point), what was being written, the bytes it needs and the bytes free, and what to do."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def temp_path(path: Path) -> Path:
    """The one name a writer of `path` uses before renaming it into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Create or replace `path` with what `write(f)` writes to a binary file object, atomically."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON value in `path`; CorruptFileError naming the file if it does not parse."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path} is not valid JSON ({err}); it was damaged or edited by hand: "
                               f"restore it from a copy, or remove it if the tool that wrote it can rebuild it") from err


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line in a single write and fsync it. After a line torn by a killed writer
    the record starts on a line of its own, so only the torn line is lost."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # Exclusive while checking the last byte and writing: another writer's line that is being
        # copied in would otherwise look torn and get a needless blank line before this one.
        with contextlib.suppress(OSError):  # a filesystem without locks: at worst a blank line
            fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        os.write(fd, (("\n" if torn else "") + json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (none if it does not exist); a torn line is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is cut short (a writer was killed); skipping it", path, number)
    return records


def rewrite_jsonl(path: str | Path, records: list[dict[str, Any]]) -> None:
    """Replace a JSON-lines file with `records`, atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


# --- a full disk, named ------------------------------------------------------------------

def mount_point(path: str | Path) -> Path:
    """The mount point of the filesystem that holds `path` (or would, for a path not made yet)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes an unprivileged writer may still write on the filesystem of `path`."""
    return shutil.disk_usage(mount_point(path)).free


def format_bytes(n: int | float) -> str:
    """ "1.5 GiB (1,610,612,736 bytes)": binary units for reading, the exact count for df."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({int(n):,} bytes)"
    return f"{int(n):,} bytes"


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` is ENOSPC or EDQUOT, or was raised from or while handling one, or gathers one
    from a rank (DCP's CheckpointException.failures: rank -> (exception, traceback))."""
    pending, seen = [err], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        pending += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            pending += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return False


def disk_full_error(path: str | Path, what: str, needed: int | None, advice: str) -> DiskFullError:
    """The error for `what` (a file or a checkpoint, at `path`) that needs `needed` bytes (None:
    not known) on a filesystem that cannot hold it, with `advice` on what to do."""
    fs, free = mount_point(path), free_bytes(path)
    need = f"takes {format_bytes(needed)}" if needed is not None else "could not be completed"
    return DiskFullError(f"no space left on the filesystem mounted at {fs}: writing {what} ({path}) {need}, and {fs} "
                         f"has {format_bytes(free)} free. {advice}")


def require_free_space(path: str | Path, needed: int, what: str, advice: str) -> None:
    """Raise DiskFullError before writing `what` at `path` when its filesystem has fewer than
    `needed` bytes free (checked where the size is known, so no write is started that cannot end)."""
    if free_bytes(path) < needed:
        raise disk_full_error(path, what, needed, advice)
