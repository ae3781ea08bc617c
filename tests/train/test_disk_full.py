"""A full disk while saving: the trainer stops with one error naming the filesystem (its mount
point), the checkpoint or snapshot being written, the bytes it needs and the bytes free, and
what to do; the checkpoint before stays complete and a resume from it is bitwise the run that
never stopped.

Before a save the free space is checked against its size (a checkpoint holds the same tensors as
the newest complete one; the first of a run, at least what the state it writes holds), so no
save is started that cannot end; a save that runs out of
space anyway (another writer took it) is named the same way, from DCP's CheckpointException
or the post-hoc EMA snapshot's OSError. The full disk is simulated (shutil.disk_usage reporting
little free, DCP's writer raising ENOSPC) and, where this process may mount one, real: a small
tmpfs, on which `dtr-scale train` stops with one line naming it, and a training picture that
cannot be drawn is a warning naming the file.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtr_scale.io import DiskFullError, format_bytes, is_disk_full, mount_point
from dtr_scale.train.checkpoint import (
    CheckpointManager, checkpoint_dir, checkpoint_name, latest_checkpoint, read_manifest, require_complete,
)
from dtr_scale.train.loop import train
from dtr_scale.train.phema import PosthocEMATracker, snapshot_dir
from dtr_scale.world import World
from tests.train.helpers import EVERY, crash_config, final_weights, logged_losses

STEPS, FULL = 3 * EVERY, 2 * EVERY  # the save at EVERY fits, the one at FULL does not (in the background
FULL_AT = checkpoint_name(FULL)      # with async_save: not the last step's, which is always synchronous)


def checkpoint_bytes(run_dir: str, step: int) -> int:
    (entry,) = [e for e in read_manifest(run_dir) if e["step"] == step]
    return sum(entry["files"].values())


def little_free(monkeypatch, free: int) -> None:
    """shutil.disk_usage reports `free` bytes free on every filesystem."""
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))


def raise_enospc_writing(monkeypatch, partial_name: str) -> None:
    """DCP's file writer fails with ENOSPC on a file of checkpoint directory `partial_name`, after
    writing part of it, as a full disk does."""
    from torch.distributed.checkpoint import filesystem

    real_write_item = filesystem._write_item

    def write_item(transforms, stream, *args, **kwargs):
        if partial_name in Path(stream.name).parts:
            stream.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_item(transforms, stream, *args, **kwargs)

    monkeypatch.setattr(filesystem, "_write_item", write_item)


def assert_named(err: DiskFullError, run_dir: str, needed: int | None, free: int | None = None) -> None:
    message = str(err)
    partial = checkpoint_dir(run_dir) / f"{FULL_AT}.partial"
    assert message.startswith(f"no space left on the filesystem mounted at {mount_point(run_dir)}: "
                              f"writing checkpoint step {FULL} ({partial}) takes {format_bytes(needed)}, and "), message
    if free is not None:
        assert f" has {format_bytes(free)} free. " in message, message
    assert "Free space there" in message and "checkpoint.keep_last=" in message, message
    assert f"the latest complete checkpoint, {checkpoint_name(EVERY)}, is untouched" in message, message
    assert err.errno == errno.ENOSPC


def assert_resume_is_bitwise(cfg, straight) -> None:
    """The checkpoint before is the latest and complete; resuming from it reaches the straight run."""
    assert [e["step"] for e in read_manifest(cfg.run_dir)] == [EVERY]
    require_complete(latest_checkpoint(cfg.run_dir))
    resumed = train(cfg)
    assert (resumed.status, resumed.step) == ("finished", STEPS)
    assert logged_losses(cfg.run_dir) == logged_losses(straight.run_dir)
    want = final_weights(straight.run_dir)
    for name, value in final_weights(cfg.run_dir).items():
        assert torch.equal(value, want[name]), name


@pytest.fixture
def straight(tiny_config, tmp_path_factory):
    """The run that never stopped, trained once for this module's tests (none of them writes to it)."""
    cfg = crash_config(tiny_config, tmp_path_factory.getbasetemp() / "disk_full_straight", steps=STEPS)
    if not read_manifest(cfg.run_dir) or read_manifest(cfg.run_dir)[-1]["step"] != STEPS:
        train(cfg)
    return cfg


def test_a_save_that_cannot_fit_is_not_started(tiny_config, tmp_path, monkeypatch, straight):
    from dtr_scale.train import checkpoint

    sized, real_state_bytes = [], checkpoint.state_bytes
    monkeypatch.setattr(checkpoint, "state_bytes", lambda *args: sized.append(args) or real_state_bytes(*args))
    cfg = crash_config(tiny_config, tmp_path / "full", steps=STEPS)
    with pytest.raises(DiskFullError) as caught:  # after the first save: the second needs what the first took
        train(cfg, on_checkpoint=lambda path, step: little_free(monkeypatch, 1000))
    assert_named(caught.value, cfg.run_dir, checkpoint_bytes(cfg.run_dir, EVERY), free=1000)
    assert len(sized) == 1  # the state is sized (and summed over ranks) at the first save only
    assert not (checkpoint_dir(cfg.run_dir) / f"{FULL_AT}.partial").exists()  # nothing of it was written
    monkeypatch.undo()  # room again
    assert_resume_is_bitwise(cfg, straight)


@pytest.mark.parametrize("async_save", [True, False], ids=["async_save", "sync_save"])
def test_enospc_in_the_middle_of_a_save_is_named(tiny_config, tmp_path, monkeypatch, straight, async_save):
    cfg = crash_config(tiny_config, tmp_path / "full", steps=STEPS, **{"checkpoint.async_save": async_save})
    raise_enospc_writing(monkeypatch, f"{FULL_AT}.partial")
    with pytest.raises(DiskFullError) as caught:
        train(cfg)
    assert_named(caught.value, cfg.run_dir, checkpoint_bytes(cfg.run_dir, EVERY))
    assert is_disk_full(caught.value.__cause__)  # DCP's CheckpointException, gathering the rank's ENOSPC
    assert not (checkpoint_dir(cfg.run_dir) / f"{FULL_AT}.partial").exists()  # its space given back
    monkeypatch.undo()
    assert_resume_is_bitwise(cfg, straight)


def test_a_failed_save_that_names_no_errno_is_named_by_the_free_space_left(tiny_config, tmp_path, monkeypatch):
    # torch.save inside DCP can fail as "unexpected pos 704 vs 598" with no OSError in the chain: a
    # failure that leaves less free than a checkpoint takes is the full disk; with room, it is itself
    from torch.distributed.checkpoint import CheckpointException, filesystem

    free: dict[str, int | None] = {"bytes": None}  # the real figure until the write fails
    real_usage, real_write_item = shutil.disk_usage, filesystem._write_item
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: real_usage(path)._replace(free=free["bytes"] or real_usage(path).free))

    def write_item(transforms, stream, *args, **kwargs):
        if f"{FULL_AT}.partial" in Path(stream.name).parts:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")
        return real_write_item(transforms, stream, *args, **kwargs)

    monkeypatch.setattr(filesystem, "_write_item", write_item)
    roomy = crash_config(tiny_config, tmp_path / "roomy", steps=STEPS, **{"checkpoint.async_save": False})
    with pytest.raises(CheckpointException, match="unexpected pos 704 vs 598"):
        train(roomy)

    full = crash_config(tiny_config, tmp_path / "full", steps=STEPS, **{"checkpoint.async_save": False})

    def fail_on_a_full_disk(transforms, stream, *args, **kwargs):
        if f"{FULL_AT}.partial" in Path(stream.name).parts:
            free["bytes"] = 4096  # after the check before the save: what the failed write left
        return write_item(transforms, stream, *args, **kwargs)

    monkeypatch.setattr(filesystem, "_write_item", fail_on_a_full_disk)
    with pytest.raises(DiskFullError) as caught:
        train(full)
    assert_named(caught.value, full.run_dir, checkpoint_bytes(full.run_dir, EVERY), free=4096)
    assert [e["step"] for e in read_manifest(full.run_dir)] == [EVERY]


def small_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"a real full filesystem needs a tmpfs mount, refused here: {mounted.stderr.strip()} "
                    f"(the simulated tests above cover the same paths)")


def test_the_first_save_of_a_run_is_refused_where_the_state_it_writes_cannot_fit(tiny_config, tmp_path, straight):
    from dtr_scale.train.components import build_model

    cfg = crash_config(tiny_config, tmp_path / "disk" / "run", steps=STEPS)
    # At least what it writes: each model parameter 4 times (weights, EMA, AdamW's two moments), each of
    # ANT-UW's 4 log-variances 3 times, all fp32; on disk the buffers (routing masks, positional embedding)
    # and DCP's framing come on top.
    needed = 4 * 4 * sum(p.numel() for p in build_model(cfg).parameters()) + 3 * 4 * 4
    on_disk = checkpoint_bytes(straight.run_dir, EVERY)
    assert 0.85 * on_disk < needed < on_disk
    disk = tmp_path / "disk"
    small_tmpfs(disk, str(needed * 3 // 4))  # room for the run's other files, not for its first checkpoint
    try:
        with pytest.raises(DiskFullError) as caught:
            train(cfg)
        message = str(caught.value)
        partial = checkpoint_dir(cfg.run_dir) / f"{checkpoint_name(EVERY)}.partial"
        assert message.startswith(f"no space left on the filesystem mounted at {disk}: writing checkpoint step "
                                  f"{EVERY} ({partial}) takes {format_bytes(needed)}, and {disk} has "), message
        free = int(re.search(r" has .*\(([\d,]+) bytes\) free. Free space there", message)[1].replace(",", ""))
        assert free < needed, message
        assert "no checkpoint of this run is complete yet" in message, message
        assert list(checkpoint_dir(cfg.run_dir).iterdir()) == []  # nothing of it was written
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


def test_a_real_full_filesystem_mid_save(tiny_config, tmp_path, monkeypatch, straight):
    disk = tmp_path / "disk"
    small_tmpfs(disk, "16m")
    try:
        cfg = crash_config(tiny_config, disk / "run", steps=STEPS)
        ballast = disk / "ballast"

        def fill_after_first(path: Path, step: int) -> None:
            # leave room for the metrics lines and meta.json, not for another checkpoint
            room = shutil.disk_usage(disk).free - 64 * 1024
            if step == EVERY and room > 0:
                ballast.write_bytes(bytes(room))

        # past the check (as when another writer takes the space after it): the write itself fails
        monkeypatch.setattr(CheckpointManager, "_require_space", lambda self, step: None)
        with pytest.raises(DiskFullError) as caught:
            train(cfg, on_checkpoint=fill_after_first)
        assert_named(caught.value, cfg.run_dir, checkpoint_bytes(cfg.run_dir, EVERY))
        assert mount_point(cfg.run_dir) == disk
        assert is_disk_full(caught.value.__cause__)
        ballast.unlink()
        monkeypatch.undo()
        assert_resume_is_bitwise(cfg, straight)
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


def test_a_post_hoc_ema_snapshot_that_cannot_be_written_is_named(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config(run_dir=str(tmp_path / "run"), phema_stds=[0.05, 0.1])
    model = torch.nn.Linear(64, 64)  # 4160 fp32 parameters: 16,640 bytes per snapshot
    tracker = PosthocEMATracker(tmp_path / "run", model, cfg, World())
    tracker.update(1)
    little_free(monkeypatch, 20_000)
    with pytest.raises(DiskFullError) as caught:
        tracker.maybe_snapshot(10, at_checkpoint=True)
    assert str(caught.value).startswith(
        f"no space left on the filesystem mounted at {mount_point(tmp_path)}: writing the post-hoc EMA snapshots of "
        f"step 10 ({snapshot_dir(tmp_path / 'run')}) takes {format_bytes(2 * 16_640)}, and {mount_point(tmp_path)} has "
        f"{format_bytes(20_000)} free. Free space there")
    assert list(snapshot_dir(tmp_path / "run").iterdir()) == []  # not started

    monkeypatch.undo()  # the check passes; the write runs out of space
    def no_space(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("dtr_scale.train.phema.atomic_write_bytes", no_space)
    with pytest.raises(DiskFullError, match=r"the post-hoc EMA snapshots of step 10 \(sigma_rel 0.05\) "
                                            r"\(.*phema-00000010-0.050.safetensors\) takes [0-9.]+ KiB"):
        tracker.maybe_snapshot(10, at_checkpoint=True)


def test_the_train_command_stops_with_one_line_naming_the_full_filesystem(tmp_path):
    # model=tiny without post-hoc EMA: a checkpoint takes about 20 MiB, so the second does not fit in 32
    disk = tmp_path / "disk"
    small_tmpfs(disk, "32m")
    try:
        done = subprocess.run(
            [str(Path(sys.executable).parent / "dtr-scale"), "train", f"run_dir={disk / 'run'}", "cluster=none",
             "world_size=1", "data=synthetic", "model=tiny", "steps=6", "global_batch_size=8", "checkpoint.every=2",
             "eval.inline=false", "logging.wandb=disabled", "sample_at_end=0", "phema_stds=[]"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 1, done.stderr[-3000:]
        (line,) = [line for line in done.stderr.splitlines() if line.startswith("dtr-scale train: error:")]
        assert line.startswith(f"dtr-scale train: error: DiskFullError: no space left on the filesystem mounted at "
                               f"{disk}: writing checkpoint step 4 ({disk}/run/checkpoints/step_00000004.partial) takes "
                               f"{format_bytes(checkpoint_bytes(str(disk / 'run'), 2))}, and {disk} has "), line
        assert [e["step"] for e in read_manifest(disk / "run")] == [2]
        require_complete(latest_checkpoint(disk / "run"))
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


def test_a_training_picture_that_cannot_be_written_is_a_warning_naming_it(tmp_path, caplog):
    # the run's own error names the full disk (above); the picture's failure is reported too, not instead
    import json

    from dtr_scale.train.metrics import metrics_path
    from dtr_scale.train.training_plot import TRAINING_PNG, TrainingPlotter

    disk = tmp_path / "disk"
    small_tmpfs(disk, "1m")
    try:
        metrics_path(disk).write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "unweighted_loss": 2.0 / s,
                                                          "interval_losses": [0.1, 0.2]}) + "\n" for s in (1, 2)))
        (disk / "ballast").write_bytes(bytes(shutil.disk_usage(disk).free))
        with caplog.at_level("WARNING", logger="dtr_scale.train.training_plot"):
            assert TrainingPlotter(disk, metrics_path(disk)).finish() is None
        assert f"could not draw {disk / TRAINING_PNG}: [Errno 28] No space left on device" in caplog.text
        assert not list(disk.glob(f".{TRAINING_PNG}.tmp-*"))  # no half-written picture left behind
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


# --- the pieces, with known answers -------------------------------------------------------

@pytest.mark.parametrize("n, text", [(0, "0 bytes"), (1023, "1,023 bytes"), (1536, "1.5 KiB (1,536 bytes)"),
                                     (3 * 2**30, "3.0 GiB (3,221,225,472 bytes)")])
def test_byte_counts_read_in_binary_units_with_the_exact_count(n, text):
    assert format_bytes(n) == text


def test_a_full_disk_is_found_wherever_it_hides_in_the_error():
    from torch.distributed.checkpoint import CheckpointException

    def raised_while_handling(inner: BaseException) -> RuntimeError:
        try:
            try:
                raise inner
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 704 vs 598")
        except RuntimeError as err:
            return err

    enospc, edquot = OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded")
    torch_save_error = raised_while_handling(enospc)  # what torch.save raises inside DCP's writer
    assert is_disk_full(enospc) and is_disk_full(edquot) and is_disk_full(torch_save_error)
    assert is_disk_full(CheckpointException("write_data", {1: (torch_save_error, None)}))  # gathered from rank 1
    assert not is_disk_full(raised_while_handling(FileNotFoundError(errno.ENOENT, "gone")))
    assert not is_disk_full(CheckpointException("write_data", {0: (ValueError("bad"), None)}))


def test_the_filesystem_is_named_by_its_mount_point(tmp_path):
    assert mount_point("/") == Path("/")
    assert mount_point(tmp_path / "not" / "made" / "yet") == mount_point(tmp_path)  # the directory a run will make
    assert os.path.ismount(mount_point(tmp_path))
