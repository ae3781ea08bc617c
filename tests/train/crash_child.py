"""One rank of a run that is SIGKILLed while it writes a checkpoint, run as a script by
test_crash_safety.py (`python crash_child.py SPEC.json`, one process per rank, RANK and the
rendezvous in the environment). DCP's file writer is patched to write the first tensor of
checkpoint `kill_at`, flush it, tell the test through a file, and hang, so the SIGKILL lands
mid-write every time rather than by luck of timing. Imports nothing of tests/, so it runs
without pytest's module setup."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import torch

from dtr_scale.train.checkpoint import checkpoint_name
from dtr_scale.train.components import config_from_dict
from dtr_scale.train.loop import train


def hang_mid_write(step: int, signal_file: Path) -> None:
    """Patch DCP so that writing checkpoint `step` stops after its first tensor, on disk."""
    from torch.distributed.checkpoint import filesystem

    real_write_item = filesystem._write_item
    partial = f"{checkpoint_name(step)}.partial"

    def write_item(transforms, stream, *args, **kwargs):
        result = real_write_item(transforms, stream, *args, **kwargs)
        if partial in Path(stream.name).parts:
            stream.flush()
            signal_file.touch()
            threading.Event().wait()  # until the test's SIGKILL
        return result

    filesystem._write_item = write_item


def child(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])  # the test process's count: same arithmetic, bitwise
    hang_mid_write(spec["kill_at"], Path(f"{spec['signal']}.{os.environ['RANK']}"))
    train(config_from_dict(spec["config"]))
    sys.exit(f"training finished without ever writing checkpoint {spec['kill_at']}")


if __name__ == "__main__":
    child(sys.argv[1])
