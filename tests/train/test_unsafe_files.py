"""No checkpoint file runs code when it is read: a payload planted in DCP's `.metadata`
(a pickle), in a DCP non-tensor value, or in the DeepSpeed backend's extra_state.pt is
refused with an error naming the file, under `dtr-scale export`, evaluation's loader and
a training resume, and the payload's marker file never appears.

The manifest is re-sealed after planting (sizes and hashes updated), as someone able to
write the checkpoint could do: the refusal must come from the loader, not the hashes."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

from dtr_scale.eval.sample import load_model
from dtr_scale.io import atomic_write_json, read_json
from dtr_scale.train.checkpoint import MANIFEST, CheckpointError, digest_files, latest_checkpoint
from dtr_scale.train.loop import train
from dtr_scale.train.safe_dcp import DCP_METADATA, SafeLoadPlanner, UnsafeCheckpointError, read_dcp_metadata

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def reseal(checkpoint: Path) -> None:
    """Rewrite the checkpoint's manifest entry for its current files (sizes and sha256)."""
    manifest_path = checkpoint.parent / MANIFEST
    manifest = read_json(manifest_path)
    for entry in manifest["checkpoints"]:
        if entry["name"] == checkpoint.name:
            entry["sha256"] = digest_files(checkpoint)
            entry["files"] = {name: (checkpoint / name).stat().st_size for name in entry["sha256"]}
    atomic_write_json(manifest_path, manifest)


def plant_in_dcp_metadata(checkpoint: Path, marker: Path) -> None:
    """A `.metadata` that stock DCP loads without complaint, after running the payload."""
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    metadata.planner_data = {"payload": Payload(marker)}
    (checkpoint / DCP_METADATA).write_bytes(pickle.dumps(metadata))
    reseal(checkpoint)


@pytest.fixture
def planted_run(tiny_config, tmp_path):
    cfg = tiny_config(run_dir=str(tmp_path / "run"), steps=2, phema_stds=[], **{"checkpoint.every": 2})
    train(cfg)
    checkpoint = latest_checkpoint(cfg.run_dir)
    marker = tmp_path / "payload-ran"
    plant_in_dcp_metadata(checkpoint, marker)
    return cfg, checkpoint, marker


def test_the_planted_metadata_is_a_real_payload(planted_run):
    # the test's own check that the file would run code under a plain unpickler
    _, checkpoint, marker = planted_run
    pickle.loads((checkpoint / DCP_METADATA).read_bytes())
    assert marker.exists()


def test_evaluation_loader_refuses_a_payload_in_dcp_metadata(planted_run):
    _, checkpoint, marker = planted_run
    with pytest.raises(CheckpointError, match=rf"refusing to load {checkpoint / DCP_METADATA}: it names posix\.system"):
        load_model(checkpoint, use_ema=True)
    with pytest.raises(UnsafeCheckpointError):
        read_dcp_metadata(checkpoint)
    assert not marker.exists()


def test_training_resume_refuses_a_payload_in_dcp_metadata(planted_run):
    cfg, checkpoint, marker = planted_run
    with pytest.raises(CheckpointError, match=rf"{DCP_METADATA}: it names posix\.system"):
        train(dataclasses.replace(cfg, steps=4))
    assert not marker.exists()


def test_export_command_refuses_a_payload_in_dcp_metadata(planted_run, tmp_path):
    _, checkpoint, marker = planted_run
    out = tmp_path / "ema.safetensors"
    run = subprocess.run([sys.executable, "-m", "dtr_scale.cli", "export", str(checkpoint), str(out)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert f"refusing to load {checkpoint / DCP_METADATA}" in run.stderr, run.stderr[-3000:]
    assert not marker.exists() and not out.exists()


def test_dcp_non_tensor_values_are_read_without_running_code(tmp_path):
    marker = tmp_path / "payload-ran"
    value = io.BytesIO()
    torch.save({"lr": 1e-3, "trap": Payload(marker)}, value)
    value.seek(0)
    planner = SafeLoadPlanner()
    planner.set_up_planner({"optim": {}}, None, True)
    item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex("optim.param_groups.0.lr"),
                    dest_offsets=torch.Size([0]), storage_index=MetadataIndex("optim.param_groups.0.lr"),
                    storage_offsets=torch.Size([0]), lengths=torch.Size([0]))
    with pytest.raises(UnsafeCheckpointError, match="optim.param_groups.0.lr.*not plain data"):
        planner.load_bytes(item, value)
    assert not marker.exists()


def test_deepspeed_extra_state_is_read_with_weights_only(tmp_path):
    from dtr_scale.train.backends.deepspeed import DeepSpeedCheckpointError, load_extra_state

    good = tmp_path / "good.pt"
    torch.save({"phema": {"stds": [0.05, 0.1], "emas": [{"w": torch.arange(3.0)}]}}, good)
    assert torch.equal(load_extra_state(good)["phema"]["emas"][0]["w"], torch.arange(3.0))

    marker = tmp_path / "payload-ran"
    evil = tmp_path / "extra_state.pt"
    torch.save({"phema": Payload(marker)}, evil)
    with pytest.raises(DeepSpeedCheckpointError, match=f"refusing to load {evil}"):
        load_extra_state(evil)
    assert not marker.exists()


def test_training_resume_refuses_a_payload_in_a_deepspeed_shard(tiny_config, tmp_path, monkeypatch):
    from dtr_scale.train.backends.deepspeed import DeepSpeedCheckpointError

    monkeypatch.setenv("LOCAL_RANK", "0")  # DeepSpeed asks for it even on one process

    cfg = tiny_config(run_dir=str(tmp_path / "run"), steps=2, phema_stds=[],
                      **{"checkpoint.every": 2, "backend.name": "deepspeed", "backend.zero_stage": 2})
    train(cfg)
    checkpoint = latest_checkpoint(cfg.run_dir)
    (shard,) = checkpoint.rglob("mp_rank_00_model_states.pt")
    state = torch.load(shard, weights_only=False)  # the test's own, trusted file
    marker = tmp_path / "payload-ran"
    state["trap"] = Payload(marker)
    torch.save(state, shard)
    reseal(checkpoint)
    with pytest.raises(CheckpointError, match=rf"refusing to load {shard}: .*posix\.system") as refused:
        train(dataclasses.replace(cfg, steps=4))
    assert isinstance(refused.value.__cause__, DeepSpeedCheckpointError)
    assert not marker.exists()
    torch.load(shard, weights_only=False)  # and it was a real payload
    assert marker.exists()


def test_the_safe_deepspeed_load_is_this_threads_alone_and_undone(tmp_path):
    import argparse
    import threading

    from dtr_scale.train.backends.deepspeed import DeepSpeedCheckpointError, deepspeed_files_read_safely

    path = tmp_path / "object.pt"
    torch.save(argparse.Namespace(answer=42), path)  # loading it runs argparse.Namespace: not plain data
    real_load, elsewhere = torch.load, {}

    def other_thread():  # a library loading its own trusted file at the same time
        elsewhere["value"] = torch.load(path, weights_only=False)

    with deepspeed_files_read_safely():
        with pytest.raises(DeepSpeedCheckpointError, match=r"refusing to load .*object.pt"):
            torch.load(path, weights_only=False)  # what DeepSpeed's own reads ask for
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert elsewhere["value"] == argparse.Namespace(answer=42)
    assert torch.load is real_load


def test_a_universal_load_is_set_on_one_engine_for_one_load():
    from dtr_scale.train.backends.deepspeed import universal_load

    class Engine:  # DeepSpeed's engine asks this method whether it loads a universal checkpoint
        def load_universal_checkpoint(self):
            return False

    engine, other = Engine(), Engine()
    with universal_load(engine, True):
        assert engine.load_universal_checkpoint() is True and other.load_universal_checkpoint() is False
    assert engine.load_universal_checkpoint() is False and "load_universal_checkpoint" not in vars(engine)
