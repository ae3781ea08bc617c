"""Crash safety of DCP checkpoints (ddp backend): a process SIGKILLed in the middle of
writing checkpoint k leaves the one before as "latest", and resuming from it reaches
the weights of a run that was never killed; a stop never rewrites (so never deletes)
the complete checkpoint of its own step; a truncated, missing or corrupted file in a
checkpoint is detected, and the error names it.

The killed runs are crash_child.py run as a script in child processes (one per rank).
Inside them DCP's file writer is patched to write the first tensor of checkpoint k,
flush it, tell the test through a file, and hang, so the SIGKILL lands mid-write every
time rather than by luck of timing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtr_scale.eval.sample import load_model
from dtr_scale.train.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    checkpoint_name,
    latest_checkpoint,
    read_manifest,
    read_meta,
    require_complete,
)
from dtr_scale.train.components import config_to_dict
from dtr_scale.train.local import free_port, run_processes, stop_after
from dtr_scale.train.loop import train
from dtr_scale.train.metrics import read_metrics
from tests.train.helpers import EVERY, STEPS, crash_config, final_weights, logged_losses

KILL_AT = 4
REPO = Path(__file__).resolve().parents[2]
CHILD = Path(__file__).with_name("crash_child.py")


def kill_mid_write(cfg, tmp_path: Path, threads: int) -> None:
    """Run `cfg` on cfg.world_size child processes and SIGKILL them all once every rank is
    in the middle of writing checkpoint KILL_AT."""
    spec = {"config": config_to_dict(cfg), "signal": str(tmp_path / "writing"), "threads": threads,
            "kill_at": KILL_AT}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    port, n = free_port(), cfg.world_size
    procs = []
    for rank in range(n):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(n),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}
        with open(tmp_path / f"child.{rank}.log", "w") as log:  # a file, not a pipe a chatty child could fill
            procs.append(subprocess.Popen([sys.executable, str(CHILD), str(spec_path)], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
    writing = [tmp_path / f"writing.{rank}" for rank in range(n)]
    try:
        deadline = time.monotonic() + 120
        while not all(f.exists() for f in writing):
            for rank, p in enumerate(procs):
                assert p.poll() is None, (tmp_path / f"child.{rank}.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "the children never reached the write of checkpoint KILL_AT"
            time.sleep(0.05)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [-signal.SIGKILL] * n


def assert_killed_mid_write(run_dir: str) -> None:
    """Checkpoint KILL_AT is a partial directory with tensor data but no DCP metadata, and
    cannot be loaded by name; the one before is the latest, complete and loadable."""
    partial = checkpoint_dir(run_dir) / f"{checkpoint_name(KILL_AT)}.partial"
    assert [e["step"] for e in read_manifest(run_dir)] == [KILL_AT - EVERY]
    latest = latest_checkpoint(run_dir)
    assert latest.name == checkpoint_name(KILL_AT - EVERY)
    shards = sorted(partial.glob("*.distcp"))
    assert shards, sorted(partial.iterdir())
    for shard in shards:  # each rank's file holds some tensors, fewer than a complete checkpoint's
        assert 0 < shard.stat().st_size < (latest / shard.name).stat().st_size, shard
    assert not (partial / ".metadata").exists()  # DCP writes it last, after every rank's data
    with pytest.raises(CheckpointError, match=f"{partial.name} is not listed"):
        require_complete(partial)
    require_complete(latest)
    assert read_meta(latest)["step"] == KILL_AT - EVERY
    load_model(latest)


@pytest.mark.parametrize("async_save", [True, False], ids=["async_save", "sync_save"])
def test_sigkill_while_writing_leaves_the_previous_checkpoint_and_resume_is_bitwise(tiny_config, tmp_path, async_save):
    straight = crash_config(tiny_config, tmp_path / "straight", **{"checkpoint.async_save": async_save})
    train(straight)
    killed = crash_config(tiny_config, tmp_path / "killed", **{"checkpoint.async_save": async_save})
    kill_mid_write(killed, tmp_path, threads=torch.get_num_threads())
    assert_killed_mid_write(killed.run_dir)

    resumed = train(killed)
    assert (resumed.status, resumed.step) == ("finished", STEPS)
    assert not list(checkpoint_dir(killed.run_dir).glob("*.partial"))  # the crashed attempt was replaced
    # each step logged once, the killed run's lines past its checkpoint replaced by the resumed run's
    assert logged_losses(killed.run_dir) == logged_losses(straight.run_dir)
    want = final_weights(straight.run_dir)
    for name, value in final_weights(killed.run_dir).items():
        assert torch.equal(value, want[name]), name


def test_sigkill_of_both_ranks_while_writing_then_resume_on_two_ranks(tiny_config, tmp_path):
    cfg = crash_config(tiny_config, tmp_path / "killed", world_size=2)
    kill_mid_write(cfg, tmp_path, threads=1)
    assert_killed_mid_write(cfg.run_dir)
    assert len(list((checkpoint_dir(cfg.run_dir) / f"{checkpoint_name(KILL_AT)}.partial").glob("*.distcp"))) == 2

    killed = dict(logged_losses(cfg.run_dir))
    run_processes(cfg, 2)
    assert latest_checkpoint(cfg.run_dir).name == checkpoint_name(STEPS)
    # the async write hung in the background while the killed run went on training and
    # logging: the resumed run replaces those lines (each step once) and retraces the
    # steps bitwise (DDP x2 -> DDP x2)
    records = logged_losses(cfg.run_dir)
    assert [step for step, _ in records] == list(range(1, STEPS + 1))
    resumed = dict(records[KILL_AT - EVERY:])
    overlap = [s for s in resumed if s in killed]
    assert overlap[:1] == [KILL_AT - EVERY + 1]  # logged before the killed write began, at least
    assert [resumed[s] for s in overlap] == [killed[s] for s in overlap]


def test_a_stop_right_after_a_checkpoint_or_a_resume_does_not_write_it_again(tiny_config, tmp_path, monkeypatch):
    # writing the same step again would delete the complete copy before renaming the new one in
    from dtr_scale.train.backends.torch_dist import TorchBackend

    written, real_save = [], TorchBackend.save

    def recording_save(self, path, **kwargs):
        written.append(path.name)
        return real_save(self, path, **kwargs)

    monkeypatch.setattr(TorchBackend, "save", recording_save)
    cfg = crash_config(tiny_config, tmp_path / "run")
    first = train(cfg, stop_requested=stop_after(EVERY))  # the stop comes right after the save at EVERY
    again = train(cfg, stop_requested=stop_after(0))  # and before the resumed run's first step
    assert (first.status, first.step, again.status, again.step) == ("stopped", EVERY, "stopped", EVERY)
    assert written == [f"{checkpoint_name(EVERY)}.partial"]
    require_complete(latest_checkpoint(cfg.run_dir))


# --- damaged files in a complete checkpoint --------------------------------------------

def train_two_checkpoints(tiny_config, tmp_path: Path):
    cfg = crash_config(tiny_config, tmp_path / "run", steps=2 * EVERY)
    train(cfg)
    return cfg, latest_checkpoint(cfg.run_dir)


def test_a_missing_file_is_named_and_resume_takes_the_checkpoint_before(tiny_config, tmp_path):
    cfg, damaged = train_two_checkpoints(tiny_config, tmp_path)
    shard = next(damaged.glob("*.distcp"))
    shard.unlink()

    assert latest_checkpoint(cfg.run_dir).name == checkpoint_name(EVERY)
    with pytest.raises(CheckpointError, match=f"{shard} is missing"):
        require_complete(damaged)
    resumed = train(cfg)  # from step EVERY, writing the damaged checkpoint anew
    assert resumed.step == 2 * EVERY
    assert latest_checkpoint(cfg.run_dir) == damaged
    require_complete(damaged)


def test_a_truncated_file_is_named_when_its_checkpoint_is_loaded_by_name(tiny_config, tmp_path):
    # that "latest" and resume pass over it: test_loop.py::test_latest_ignores_a_truncated_checkpoint
    _, damaged = train_two_checkpoints(tiny_config, tmp_path)
    shard = next(damaged.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f"{shard} has 1000 bytes, the manifest recorded \\d+ \\(truncated"):
        require_complete(damaged)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_named_and_resume_falls_back_to_the_checkpoint_before(tiny_config, tmp_path, caplog):
    cfg, damaged = train_two_checkpoints(tiny_config, tmp_path)
    shard = next(damaged.glob("*.distcp"))
    size = shard.stat().st_size
    flip_byte(shard, size // 2)  # same size: only the content hash can see it
    assert shard.stat().st_size == size

    with pytest.raises(CheckpointError, match=f"{shard} does not match its sha256"):
        load_model(damaged)  # what export and evaluation read
    assert latest_checkpoint(cfg.run_dir, contents=True).name == checkpoint_name(EVERY)
    caplog.set_level("INFO")
    resumed = train(dataclasses.replace(cfg, steps=2 * EVERY))
    assert f"skipping checkpoint {damaged}: {shard} does not match its sha256" in caplog.text
    assert f"resumed at step {EVERY}" in caplog.text
    assert resumed.step == 2 * EVERY
    require_complete(damaged)  # written anew


def test_a_single_corrupt_checkpoint_is_an_error_not_a_restart_from_zero(tiny_config, tmp_path):
    cfg = crash_config(tiny_config, tmp_path / "run", steps=EVERY)
    train(cfg)
    damaged = latest_checkpoint(cfg.run_dir)
    shard = next(damaged.glob("*.distcp"))
    shard.write_bytes(bytes(shard.stat().st_size))  # same size, zeros
    with pytest.raises(CheckpointError, match=f"(?s)none of the checkpoints.*{shard} does not match its sha256"):
        train(dataclasses.replace(cfg, steps=2 * EVERY))


def test_a_missing_manifest_beside_checkpoints_is_an_error_naming_what_to_do(tiny_config, tmp_path):
    cfg, latest = train_two_checkpoints(tiny_config, tmp_path)
    manifest = checkpoint_dir(cfg.run_dir) / "manifest.json"
    manifest.unlink()
    before = {p: p.stat().st_mtime_ns for p in checkpoint_dir(cfg.run_dir).rglob("*")}
    with pytest.raises(CheckpointError, match=f"{manifest} is missing, but .* holds step_00000002, step_00000004.*"
                                              f"Restore manifest.json"):
        train(dataclasses.replace(cfg, steps=3 * EVERY))
    assert {p: p.stat().st_mtime_ns for p in checkpoint_dir(cfg.run_dir).rglob("*")} == before  # nothing overwritten
    assert [r["step"] for r in read_metrics(cfg.run_dir)] == list(range(1, 2 * EVERY + 1))


def test_corrupt_manifest_or_meta_json_is_named(tiny_config, tmp_path):
    cfg, latest = train_two_checkpoints(tiny_config, tmp_path)
    manifest = checkpoint_dir(cfg.run_dir) / "manifest.json"
    good = manifest.read_text()
    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=f"{manifest} is damaged"):
        latest_checkpoint(cfg.run_dir)
    with pytest.raises(CheckpointError, match=f"{manifest} is damaged"):
        train(cfg)
    manifest.write_text(good)
    (latest / "meta.json").write_text('{"step": ')
    with pytest.raises(CheckpointError, match=f"{latest / 'meta.json'} is not valid JSON"):
        read_meta(latest)


def test_a_commit_interrupted_between_manifest_and_rename_is_completed(tiny_config, tmp_path):
    cfg, latest = train_two_checkpoints(tiny_config, tmp_path)
    latest.rename(latest.with_name(f"{latest.name}.partial"))  # the crash window of a commit
    resumed = train(dataclasses.replace(cfg, steps=2 * EVERY))
    assert resumed.step == 2 * EVERY
    assert latest_checkpoint(cfg.run_dir, contents=True) == latest
    assert not list(checkpoint_dir(cfg.run_dir).glob("*.partial"))

