"""`data.remote=s3://bucket/prefix`: shards fetched on demand into `data.path` through streaming's downloader,
against an S3 endpoint these tests start on loopback (moto's standalone server). Same order, same exact
resume and same integrity checks as a local dataset; bad input is a named error before the first batch.
The store and its client are the `s3_endpoint` and `s3` fixtures of tests/conftest.py."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtr_scale.data.integrity import MARK_NAME
from dtr_scale.data.loader import build_shard_loader
from dtr_scale.data.shard_format import ShardDataError, read_manifest

FORMATS = ("mds", "webdataset")


def upload(s3, root, bucket, prefix, *, skip=()):
    """The prepared dataset at root -> s3://bucket/prefix, as `aws s3 sync` would (no local-only files)."""
    s3.create_bucket(Bucket=bucket)
    for directory, _, names in os.walk(root):
        for name in names:
            relpath = os.path.relpath(os.path.join(directory, name), root)
            if not name.startswith(MARK_NAME) and relpath not in skip:
                s3.upload_file(os.path.join(directory, name), bucket, f"{prefix}/{relpath}")
    return f"s3://{bucket}/{prefix}"


def loader(path, fmt, remote=None, workers=0, rank=0, world=1):
    return build_shard_loader(path, format=fmt, global_batch_size=40, rank=rank, world_size=world, seed=3,
                              num_workers=workers, remote=remote)


def batches(it, n):
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_remote_dataset_gives_the_local_sequence_and_resumes_exactly(identity_datasets, fmt, s3, tmp_path):
    local = identity_datasets[fmt]
    remote = upload(s3, local, f"data-{fmt}", "in256/v1")
    cache = str(tmp_path / "cache")
    expected = batches(loader(local, fmt), 8)  # crosses into the second epoch (5 steps each)

    it = loader(cache, fmt, remote, workers=2)
    assert_same(batches(it, 3), expected[:3])
    state = it.state_dict()
    it.close()
    # A requeue on another node: an empty cache, two ranks; together they read the same global batches.
    halves = [loader(str(tmp_path / f"node{rank}"), fmt, remote, rank=rank, world=2) for rank in (0, 1)]
    for half in halves:
        half.load_state_dict(state)
    resumed = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*(batches(h, 5) for h in halves))]
    assert_same(resumed, expected[3:])

    fetched = {os.path.relpath(os.path.join(d, n), cache) for d, _, names in os.walk(cache) for n in names}
    shards = [e["path"] for e in read_manifest(cache)["shards"]]
    assert set(shards) <= fetched and f"{shards[0]}.xxh3.npy" in fetched
    assert read_manifest(cache) == read_manifest(local)


def test_a_shard_the_store_returns_truncated_is_a_named_error_and_leaves_the_cache(identity_datasets, s3, tmp_path):
    local = identity_datasets["mds"]
    remote = upload(s3, local, "truncated", "ds")
    relpath = read_manifest(local)["shards"][1]["path"]
    with open(os.path.join(local, relpath), "rb") as f:
        s3.put_object(Bucket="truncated", Key=f"ds/{relpath}", Body=f.read()[:1000])  # a cut upload
    cache = str(tmp_path / "cache")
    it = loader(cache, "mds", remote)
    with pytest.raises(ShardDataError) as err:
        batches(it, it.steps_per_epoch)
    message = str(err.value)
    assert os.path.join(cache, relpath) in message and "truncated or damaged: 1000 bytes" in message
    assert f"fetched from {remote}/{relpath}" in message
    assert not os.path.exists(os.path.join(cache, relpath))  # the next start fetches it again


def test_an_unreachable_endpoint_is_a_named_error_before_the_first_batch(monkeypatch, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    with pytest.raises(ShardDataError, match=rf"cannot fetch s3://bucket/ds/manifest.json through "
                                             rf"S3_ENDPOINT_URL=http://127.0.0.1:{port}.*EndpointConnectionError"):
        loader(str(tmp_path / "cache"), "mds", "s3://bucket/ds")
    assert time.monotonic() - started < 15


def test_a_bucket_without_the_manifest_is_a_named_error(identity_datasets, s3, tmp_path):
    remote = upload(s3, identity_datasets["mds"], "no-manifest", "ds", skip={"manifest.json"})
    with pytest.raises(ShardDataError, match=rf"cannot fetch {remote}/manifest.json .*must hold manifest.json"):
        loader(str(tmp_path / "cache"), "mds", remote)
    with pytest.raises(ShardDataError, match=r"cannot fetch s3://no-manifest/elsewhere/manifest.json"):
        loader(str(tmp_path / "cache"), "mds", "s3://no-manifest/elsewhere")


def test_a_cache_holding_another_version_of_the_dataset_is_refused(identity_datasets, noisy_datasets, s3, tmp_path):
    cache = str(tmp_path / "cache")
    loader(cache, "mds", upload(s3, identity_datasets["mds"], "version-1", "ds"))
    with pytest.raises(ShardDataError, match=rf"the cache {cache} holds another version of the dataset"):
        loader(cache, "mds", upload(s3, noisy_datasets["mds"], "version-2", "ds"))


def test_a_training_run_on_a_remote_dataset_prints_no_botocore_chatter(identity_datasets, s3, tmp_path):
    # botocore logs "Found credentials in environment variables." at INFO, which a run's console (Hydra's
    # job logging: INFO on stdout) printed once per process that fetched
    remote = upload(s3, identity_datasets["mds"], "quiet", "ds")
    command = [str(Path(sys.executable).parent / "dtr-scale"), "train", f"run_dir={tmp_path / 'run'}", "cluster=none",
               "world_size=1", f"data.path={tmp_path / 'cache'}", f"data.remote={remote}", "data.embedded=false",
               "data.num_workers=1", "model.input_size=4", "steps=2", "global_batch_size=8", "checkpoint.every=2",
               "eval.inline=false", "logging.wandb=disabled", "sample_at_end=0", "phema_stds=[]"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "checkpoint" in done.stdout and "step_00000002 complete" in done.stdout  # the console has INFO lines
    assert "credentials" not in done.stdout + done.stderr


def test_a_level_the_user_gave_botocores_logger_is_kept():
    import logging

    from dtr_scale.data.remote import quiet_store_clients

    botocore = logging.getLogger("botocore")
    before = botocore.level
    try:
        for given, kept in ((logging.NOTSET, logging.WARNING), (logging.DEBUG, logging.DEBUG)):
            botocore.setLevel(given)
            quiet_store_clients()
            assert botocore.level == kept
    finally:
        botocore.setLevel(before)
