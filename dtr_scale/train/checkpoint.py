"""Checkpoints of a run: atomic writes, a manifest of the complete ones, and
"latest" resolution that never returns a partial file.

Layout: RUN_DIR/checkpoints/step_00001000.pt, plus manifest.json listing the
complete checkpoints in order. A checkpoint is written to a temporary name,
fsynced and renamed; only then is it added to the manifest (itself replaced
atomically). A crash at any point leaves the previous latest intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or unreadable; the message names the file."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(run_dir: str | Path) -> list[dict[str, Any]]:
    path = checkpoint_dir(run_dir) / MANIFEST
    if not path.exists():
        return []
    return json.loads(path.read_text())["checkpoints"]


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / checkpoint_name(step)
    _write_atomic(path, lambda f: torch.save(state, f))
    entries = [e for e in read_manifest(run_dir) if e["step"] != step]
    entries.append({"step": step, "file": path.name, "bytes": path.stat().st_size})
    entries.sort(key=lambda e: e["step"])
    _write_atomic(directory / MANIFEST, lambda f: f.write(json.dumps({"checkpoints": entries}, indent=1).encode()))
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint the manifest lists as complete and whose file is still there."""
    directory = checkpoint_dir(run_dir)
    for entry in reversed(read_manifest(run_dir)):
        path = directory / entry["file"]
        if path.exists() and path.stat().st_size == entry["bytes"]:
            return path
    return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated zips / pickles
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); "
                              "it is truncated or corrupt: delete it or resume from an earlier one") from err
