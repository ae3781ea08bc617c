"""Disk a run needs: latent shards, retained checkpoints, post-hoc EMA snapshots."""

import json

import pytest

from plan_helpers import gpu_run

from dtr_scale.config import CheckpointConfig, DataConfig, EvalConfig, WeightingConfig
from dtr_scale.plan.model_cost import count_parameters
from dtr_scale.plan.storage import (
    checkpoint_bytes,
    checkpoints_kept,
    dataset_size,
    latent_shard_bytes,
    phema_snapshot_count,
)


def test_imagenet_latents_by_hand(tmp_path):
    # 1,281,167 images x 2 (image, flip) x 8 (mean and std of 4 channels) x 32 x 32 x 2 bytes (fp16)
    assert latent_shard_bytes(1_281_167, 4, 32, 2) == 1_281_167 * 32_768 == 41_981_280_256
    cfg = gpu_run(data=DataConfig(kind="shards", path=str(tmp_path / "not_prepared")))
    size = dataset_size(cfg)
    assert size.bytes == 41_981_280_256 and "estimated" in size.source and "ImageNet" in size.source


def test_prepared_shards_are_sized_from_their_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"num_samples": 1000, "stored_shape": [2, 8, 4, 4], "dtype": "float32"}))
    size = dataset_size(gpu_run(data=DataConfig(kind="shards", path=str(tmp_path))))
    assert size.bytes == 1000 * 2 * 8 * 4 * 4 * 4
    assert "manifest.json" in size.source


def test_checkpoint_bytes_by_hand():
    cfg = gpu_run("DiT-L/2", weighting=WeightingConfig(kind="ant_uw", num_intervals=8))
    params = count_parameters(cfg)
    # model + EMA + 2 post-hoc EMA profiles (fp32 state dicts), AdamW m and v, 8 UW log-variances with m and v
    assert checkpoint_bytes(cfg, params) == 4 * params.state_bytes + 8 * params.total + 3 * 4 * 8
    deepspeed = gpu_run("DiT-L/2", "deepspeed", weighting=WeightingConfig(kind="ant_uw", num_intervals=8))
    assert checkpoint_bytes(deepspeed, params) - checkpoint_bytes(cfg, params) == 4 * params.total


@pytest.mark.parametrize("steps,keep_last,keep_every,kept", [
    (2_000_000, 3, 400_000, 7),  # 1.9M, 1.95M, 2M and 400K, 800K, 1.2M, 1.6M (2M counted once)
    (2_000_000, 3, 0, 3),
    (120_000, 2, 0, 2),  # saves at 50K, 100K and the last step, 120K
])
def test_checkpoints_kept_over_the_run(steps, keep_last, keep_every, kept):
    cfg = gpu_run(steps=steps, checkpoint=CheckpointConfig(every=50_000, keep_last=keep_last, keep_every=keep_every))
    assert checkpoints_kept(cfg) == kept


def test_the_full_evaluations_milestones_are_kept_beside_the_retention_policy():
    # keep_last 3 keeps 1.9M, 1.95M, 2M; the milestones add 400K and 1M (2M, the last step, is kept already)
    cfg = gpu_run(steps=2_000_000, checkpoint=CheckpointConfig(every=50_000, keep_last=3),
                  eval=EvalConfig(every=50_000, milestones=[400_000, 1_000_000, -1]))
    assert checkpoints_kept(cfg) == 5


def test_posthoc_ema_snapshots():
    assert phema_snapshot_count(gpu_run(steps=2_000_000)) == 40  # one per 50K checkpoint
    assert phema_snapshot_count(gpu_run(steps=400_000, phema_every=10_000)) == 40
    assert phema_snapshot_count(gpu_run(phema_stds=())) == 0
