"""What a run's checkpoints are on disk: the manifest, which checkpoints are complete, their meta.

    RUN_DIR/checkpoints/manifest.json        the complete checkpoints, oldest first, with the
                                             size and sha256 of every file
    RUN_DIR/checkpoints/step_00001000/       one checkpoint: the backend's files + meta.json

Plain files and JSON, no torch: `dtr-scale status` reads this from login nodes. Writing and
loading checkpoints is `dtr_scale.train.checkpoint`'s.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any

from dtr_scale.io import CorruptFileError, read_json

MANIFEST = "manifest.json"
META = "meta.json"
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt or unreadable; the message names the file."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def file_digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def digest_files(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    return {str(p.relative_to(directory)): file_digest(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def read_manifest(run_dir: str | Path) -> list[dict[str, Any]]:
    """The manifest's entries, oldest first; none for a fresh run. A missing manifest beside
    committed checkpoints, or one that does not parse, is a CheckpointError (resuming from
    step 0 there would overwrite them)."""
    root = checkpoint_dir(run_dir)
    path = root / MANIFEST
    if not path.exists():
        orphans = sorted(p.name for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
        if orphans:
            raise CheckpointError(
                f"{path} is missing, but {root} holds {', '.join(orphans)}: without the manifest no checkpoint can be "
                f"trusted, and starting from step 0 would overwrite them. Restore {MANIFEST} from a copy, or move "
                f"those directories out of {root} to start the run afresh")
        return []
    try:
        return read_json(path)["checkpoints"]
    except (CorruptFileError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is damaged ({err}); restore it from a copy, or move {root} aside "
                              f"to start the run afresh") from err


def newest_checkpoint_bytes(run_dir: str | Path) -> int:
    """Bytes the manifest records for the newest checkpoint's files (0 before the first): what the
    next checkpoint takes on disk, as it holds the same tensors."""
    entries = read_manifest(run_dir)
    return sum(entries[-1]["files"].values()) if entries else 0


def verify_checkpoint(path: Path, entry: dict[str, Any], *, contents: bool = False) -> str | None:
    """Why the checkpoint at `path` is not usable, or None if every file is there at its size
    (and, with `contents`, has the content hash the manifest recorded)."""
    for name, size in entry["files"].items():
        f = path / name
        if not f.exists():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, the manifest recorded {size} (truncated?)"
    if contents:
        for name, digest in entry.get("sha256", {}).items():
            if file_digest(path / name) != digest:
                return f"{path / name} does not match its sha256 in the manifest (corrupted on disk)"
    return None


def checked_checkpoints(run_dir: str | Path, *, contents: bool = False) -> list[tuple[int, Path, str | None]]:
    """(step, path, why it is not usable or None) of every manifest entry, oldest first."""
    checked = []
    for entry in read_manifest(run_dir):
        path = checkpoint_dir(run_dir) / entry["name"]
        checked.append((int(entry["step"]), path, verify_checkpoint(path, entry, contents=contents)))
    return checked


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every manifest entry whose files are all there at their recorded sizes,
    oldest first (content hashes are checked when one is loaded). A `.partial` directory is
    never in the manifest, so it is never listed."""
    return [(step, path) for step, path, problem in checked_checkpoints(run_dir) if problem is None]


def latest_checkpoint(run_dir: str | Path, *, contents: bool = False) -> Path | None:
    """The newest complete checkpoint; damaged ones newer than it are reported and passed over.
    With `contents`, the files' hashes are checked too (reads every file)."""
    for _, path, problem in reversed(checked_checkpoints(run_dir, contents=contents)):
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path, problem)
    return None


def require_complete(path: str | Path) -> None:
    """Raise CheckpointError naming the missing, truncated or corrupted file if checkpoint `path`
    is not as its manifest entry records it (for loading one checkpoint by name, not "latest")."""
    path = Path(path)
    entry = next((e for e in read_manifest(path.parent.parent) if e["name"] == path.name), None)
    if entry is None:
        raise CheckpointError(f"{path} is not listed in {path.parent / MANIFEST}: it was never completed "
                              f"(a crash while writing?) or is not a dtr-scale checkpoint; pick a listed one")
    problem = verify_checkpoint(path, entry, contents=True)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}; use an earlier checkpoint")


def read_meta(path: str | Path) -> dict[str, Any]:
    meta = Path(path) / META
    if not meta.exists():
        raise CheckpointError(f"{meta} does not exist: {path} is not a complete dtr-scale checkpoint")
    try:
        return read_json(meta)
    except CorruptFileError as err:
        raise CheckpointError(f"{err}; checkpoint {path} is damaged: use an earlier one") from err


def retained(steps: list[int], keep_last: int, keep_every: int) -> set[int]:
    """The steps a retention policy keeps: the last `keep_last`, plus every `keep_every`-th."""
    keep = set(sorted(steps)[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def roll_forward(run_dir: str | Path) -> None:
    """Finish the rename of a checkpoint whose manifest entry was written just before a crash."""
    root = checkpoint_dir(run_dir)
    for entry in read_manifest(run_dir):
        final, partial = root / entry["name"], root / f"{entry['name']}.partial"
        if not partial.is_dir() or verify_checkpoint(partial, entry, contents=True) is not None:
            continue  # the usual case: no partial, or the partial of a later, unfinished save
        if not final.exists() or verify_checkpoint(final, entry, contents=True) is not None:
            log.info("completing the commit of %s, interrupted by a crash", final)
            shutil.rmtree(final, ignore_errors=True)
            partial.replace(final)
