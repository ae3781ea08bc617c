"""A damaged shard stops the training loader with its name, the sample being read and what to do;
it never feeds wrong numbers or fails with a library's IndexError."""

import os
import shutil

import pytest

from dtr_scale.data.loader import build_shard_loader
from dtr_scale.data.shard_format import ShardDataError, read_manifest

FORMATS = ("mds", "webdataset")


def damaged_copy(identity_datasets, fmt, tmp_path, damage):
    """A copy of the 200-sample dataset whose second shard `damage(path)` altered; returns (root, shard path)."""
    root = shutil.copytree(identity_datasets[fmt], tmp_path / fmt)
    shard = os.path.join(root, read_manifest(str(root))["shards"][1]["path"])
    damage(shard)
    return str(root), shard


def flip_a_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) * 2 // 3)


def read_an_epoch(root, fmt):
    loader = build_shard_loader(root, format=fmt, global_batch_size=40, rank=0, world_size=1, seed=0)
    for _ in range(loader.steps_per_epoch):
        next(loader)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_flipped_byte_in_a_shard_is_an_error_naming_the_shard(identity_datasets, fmt, tmp_path):
    root, shard = damaged_copy(identity_datasets, fmt, tmp_path, flip_a_byte)
    assert os.path.getsize(shard) == os.path.getsize(os.path.join(identity_datasets[fmt], os.path.relpath(shard, root)))
    with pytest.raises(ShardDataError, match=r"does not match the sha256 that manifest.json records") as err:
        read_an_epoch(root, fmt)
    message = str(err.value)
    assert shard in message and "reading sample" in message and f"dtr-prep verify {root}" in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_truncated_shard_is_an_error_naming_the_shard_and_the_fix(identity_datasets, fmt, tmp_path):
    root, shard = damaged_copy(identity_datasets, fmt, tmp_path, truncate)
    with pytest.raises(ShardDataError) as err:
        read_an_epoch(root, fmt)
    message = str(err.value)
    assert shard in message and "reading sample" in message and "rerun `dtr-prep images`" in message
    if fmt == "mds":  # MDS's index knows each shard's size
        assert "truncated or damaged" in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_intact_shards_are_read_as_before(identity_datasets, fmt):
    read_an_epoch(identity_datasets[fmt], fmt)
