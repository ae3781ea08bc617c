"""load_model refuses a damaged checkpoint with a CheckpointError that names the bad file."""

import shutil

import pytest

from dtr_scale.config import to_train_config
from dtr_scale.eval.sample import load_model
from dtr_scale.train.checkpoint import CheckpointError, latest_checkpoint


@pytest.fixture(scope="module")
def trained_tiny_run(tmp_path_factory):
    """RUN_DIR of a tiny DiT trained for 2 steps, with one checkpoint at step 2; tests copy it."""
    from dtr_scale.train.loop import train

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    cfg = to_train_config({
        "model": {"name": "DiT-S/2", "input_size": 8, "in_channels": 4, "num_classes": 4,
                  "depth": 2, "hidden_size": 64, "num_heads": 4},
        "data": {"kind": "synthetic", "num_samples": 64},
        "run_dir": str(run_dir), "steps": 2, "global_batch_size": 4, "sample_at_end": 0, "phema_stds": [],
        "checkpoint": {"every": 2}, "logging": {"every": 1, "wandb": "disabled"},
    })
    assert train(cfg).status == "finished"
    return run_dir


@pytest.fixture
def checkpoint(trained_tiny_run, tmp_path):
    return latest_checkpoint(shutil.copytree(trained_tiny_run, tmp_path / "run"))


def largest_shard(checkpoint):
    return max(checkpoint.glob("*.distcp"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("use_ema", [True, False])
def test_a_truncated_file_is_named_before_anything_is_read(checkpoint, use_ema):
    shard = largest_shard(checkpoint)
    shard.write_bytes(shard.read_bytes()[:100])  # torn write: the manifest's size no longer matches
    with pytest.raises(CheckpointError, match=f"{shard.name} has 100 bytes"):
        load_model(checkpoint, use_ema=use_ema)


def test_an_unreadable_file_of_the_recorded_size_names_the_checkpoint(checkpoint):
    shard = largest_shard(checkpoint)
    shard.write_bytes(bytes(shard.stat().st_size))  # passes the size check, not the content hash
    with pytest.raises(CheckpointError, match=f"checkpoint {checkpoint} is damaged: .*{shard.name}"):
        load_model(checkpoint)
