"""Where prep keeps its work in the output directory, and how the work is cut up.

    OUT/prep.json                        settings and listing identity; every part must agree with it
    OUT/chunk-000123/                    one chunk: `shard_size` consecutive listing positions, finished
    OUT/.chunk-000123.tmp-<host>-<pid>/  the same while being written; renamed when complete
    OUT/parts/part-00002-of-00008.json   marker of one part (a contiguous run of chunks): started, or done
    OUT/manifest.json, report.json, index.json   written by merge

Chunks are cut from the listing alone, so their contents do not depend on how many parts ran them: a rerun
with another --num-parts reuses every finished chunk. A killed run loses at most its unfinished chunks.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile

from dtr_scale.io import atomic_write_text

PREP_NAME = "prep.json"
CHUNK_META = "chunk.json"
REPORT_NAME = "report.json"


class PrepError(RuntimeError):
    """An output directory or a run setting that prep cannot work with; the message says what to do."""


def chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}"


def chunk_dir(out: str, chunk: int) -> str:
    return os.path.join(out, chunk_name(chunk))


def tmp_chunk_dir(out: str, chunk: int) -> str:
    return os.path.join(out, f".{chunk_name(chunk)}.tmp-{socket.gethostname()}-{os.getpid()}")


def stale_tmp_dirs(out: str, chunk: int) -> list[str]:
    prefix = f".{chunk_name(chunk)}.tmp-"
    return [os.path.join(out, n) for n in os.listdir(out) if n.startswith(prefix)]


def chunk_is_done(out: str, chunk: int) -> bool:
    return os.path.isfile(os.path.join(chunk_dir(out, chunk), CHUNK_META))


def part_marker(out: str, part: int, num_parts: int) -> str:
    return os.path.join(out, "parts", f"part-{part:05d}-of-{num_parts:05d}.json")


def chunk_ranges(num_items: int, shard_size: int) -> list[range]:
    """Listing positions of each chunk."""
    return [range(start, min(start + shard_size, num_items)) for start in range(0, num_items, shard_size)]


def part_chunks(num_chunks: int, part: int, num_parts: int) -> range:
    """The chunks of one part: contiguous, sizes differing by at most one, together covering all chunks."""
    if num_parts < 1 or not 0 <= part < num_parts:
        raise PrepError(f"--part {part} is outside --num-parts {num_parts} (parts count from 0)")
    return range(part * num_chunks // num_parts, (part + 1) * num_chunks // num_parts)


def parts_of_chunks(chunks: list[int], num_chunks: int, num_parts: int) -> list[int]:
    """Which parts own these chunks under a split into num_parts."""
    return sorted({p for p in range(num_parts) for c in chunks if c in part_chunks(num_chunks, p, num_parts)})


def write_json_atomic(path: str, obj) -> None:
    """Write atomically (readers never see half a file), keys sorted so reruns give the same bytes."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def check_output_dir(out: str) -> None:
    """Create `out` if needed and prove it writable, before any image is read."""
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise PrepError(f"output directory {out} is not writable ({err.strerror or err}); "
                        "choose a directory you can write to") from None
