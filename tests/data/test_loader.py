import gc
import json
import os

import numpy as np
import pytest
import torch

from dtr_scale.data.latents import draw_noise_and_flips
from dtr_scale.data import open_files
from dtr_scale.data.loader import build_shard_loader, read_manifest
from dtr_scale.data.shard_format import ShardDataError


def loader(path, fmt="mds", batch=16, rank=0, world=1, seed=0, workers=0, hflip=True):
    return build_shard_loader(path, format=fmt, global_batch_size=batch, rank=rank, world_size=world, seed=seed,
                              num_workers=workers, hflip=hflip)


def stored_moments(path):
    """Every sample's moments [n, 2, 2C, h, w], decoded by streaming's own reader (not the loader's)."""
    from streaming import LocalDataset

    dataset = LocalDataset(local=path)
    return np.stack([dataset[i]["moments"] for i in range(len(dataset))])


def take(it, n):
    return [next(it) for _ in range(n)]


def sample_ids(latents):
    """Identity dataset: sample i's latent is the constant i / 127.5 - 1 (fp16-stored)."""
    ids = ((latents[:, 0, 0, 0] + 1) * 127.5).round().long()
    assert torch.equal(latents, ((ids.float() / 127.5 - 1).half().float()).reshape(-1, 1, 1, 1).expand_as(latents))
    return ids


@pytest.mark.parametrize("fmt", ["mds", "webdataset"])
def test_two_ranks_with_two_workers_read_disjoint_samples_covering_the_epoch(identity_datasets, fmt):
    path = identity_datasets[fmt]
    per_rank = {}
    for rank in (0, 1):
        batches = take(loader(path, fmt, batch=40, rank=rank, world=2, workers=2), 5)  # 200 / 40 = 5 steps
        per_rank[rank] = torch.cat([sample_ids(latents) for latents, _ in batches])
        assert all(labels.dtype == torch.int64 and len(labels) == 20 for _, labels in batches)
        labels = torch.cat([labels for _, labels in batches])
        assert torch.equal(labels, per_rank[rank] % 10)
    seen = torch.cat([per_rank[0], per_rank[1]])
    assert len(set(per_rank[0].tolist()) & set(per_rank[1].tolist())) == 0
    assert sorted(seen.tolist()) == list(range(200))


@pytest.mark.parametrize("fmt", ["mds", "webdataset"])
def test_workers_do_not_change_the_batches(noisy_datasets, fmt):
    path = noisy_datasets[fmt]
    in_process = take(loader(path, fmt), 6)  # 6 steps of 16 over 64 samples: into epoch 1
    for (x0, y0), (x2, y2) in zip(in_process, take(loader(path, fmt, workers=2), 6)):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


@pytest.mark.parametrize("fmt", ["mds", "webdataset"])
def test_each_sample_lands_in_its_place_and_each_file_is_opened_once(identity_datasets, fmt, monkeypatch):
    opened = []
    real_open = open_files.os.open
    monkeypatch.setattr(open_files.os, "open", lambda path, flags: opened.append(path) or real_open(path, flags))
    it = loader(identity_datasets[fmt], fmt, batch=40)
    for step in range(6):  # 200 samples in 4 shards, 40 a step: every sample of every shard read at least once
        latents, labels = next(it)
        positions = torch.tensor(it.order.rank_positions(step))
        assert torch.equal(sample_ids(latents), positions) and torch.equal(labels, positions % 10)
    data_files = [p for p in opened if p.endswith((".mds", ".tar"))]
    assert len(data_files) == len(set(data_files)) == len(read_manifest(identity_datasets[fmt])["shards"])
    assert len(opened) == len(set(opened))  # the per-sample hashes (and a tar's index) too: once each


def test_a_batch_is_announced_to_the_kernel_before_its_first_read(identity_datasets, monkeypatch):
    """Every sample's exact byte range is hinted WILLNEED before the batch's first read (the disk queues them
    all), each file has read-ahead off (RANDOM), and each read asks for the hinted range."""
    calls = []
    real_fadvise, real_preadv = open_files.os.posix_fadvise, open_files.os.preadv
    monkeypatch.setattr(open_files.os, "posix_fadvise", lambda fd, offset, size, advice: calls.append(
        ("advise", fd, offset, size, advice)) or real_fadvise(fd, offset, size, advice))
    monkeypatch.setattr(open_files.os, "preadv", lambda fd, buffers, offset: calls.append(
        ("read", fd, offset, sum(len(b) for b in buffers), None)) or real_preadv(fd, buffers, offset))
    from streaming import LocalDataset

    stored = LocalDataset(local=identity_datasets["mds"])
    # An MDS sample: the source column's uint32 length, index and label (int64), the moments, the source.
    record_sizes = [4 + 8 + 8 + stored[i]["moments"].nbytes + len(stored[i]["source"].encode()) for i in range(200)]
    it = loader(identity_datasets["mds"], batch=40)
    for step in range(3):
        calls.clear()
        next(it)
        hints = [c[1:4] for c in calls if c[4] == os.POSIX_FADV_WILLNEED]
        reads = [c[1:4] for c in calls if c[0] == "read"]
        first_read = next(i for i, c in enumerate(calls) if c[0] == "read")
        assert len(reads) == 40 and hints == reads  # same ranges, same order
        assert all(c[4] != os.POSIX_FADV_WILLNEED for c in calls[first_read:])
        assert sorted(size for _, _, size in reads) == sorted(record_sizes[p] for p in it.order.rank_positions(step))
    assert all(c[2:4] == (0, 0) for c in calls if c[4] == os.POSIX_FADV_RANDOM)


def test_open_files_keep_at_most_their_capacity_and_close_when_dropped(tmp_path):
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"f{i}"))
        with open(paths[-1], "wb") as f:
            f.write(bytes(range(i, i + 8)))
    files = open_files.OpenFiles(capacity=2)
    fds = [files.fd(p) for p in paths]
    assert [files.pread(p, 2, 1) for p in paths[1:]] == [bytes([2, 3]), bytes([3, 4])]
    assert files.fd(paths[1]) == fds[1]  # kept, not reopened
    with pytest.raises(OSError):
        os.fstat(fds[0])  # the least recently used one was closed
    buffer = bytearray(6)
    assert files.read_into(paths[2], memoryview(buffer), 4) == 4 and buffer[:4] == bytes([6, 7, 8, 9])
    del files
    gc.collect()
    for fd in fds[1:]:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_latents_are_fresh_posterior_draws_of_image_or_flip(noisy_datasets):
    path = noisy_datasets["mds"]
    moments = stored_moments(path)
    it = loader(path, batch=16, seed=4)
    for step in range(5):  # crosses into epoch 1: same samples, new noise and flips
        latents, labels = next(it)
        positions = it.order.rank_positions(step)
        eps, flips = draw_noise_and_flips(4, it.order.epoch(step), positions, (4, 4, 4))
        chosen = torch.from_numpy(moments[positions, flips.astype(int)].astype(np.float32))
        torch.testing.assert_close(latents, chosen[:, :4] + 0.5 * eps, rtol=0, atol=0)
        assert torch.equal(labels, torch.from_numpy(positions % 10))
        assert latents.shape == (16, 4, 4, 4) and latents.dtype == torch.float32


def test_without_hflip_every_latent_is_of_the_image_itself_with_the_same_noise(noisy_datasets):
    path = noisy_datasets["mds"]
    moments = stored_moments(path)
    flipped, unflipped = loader(path, batch=16, seed=4), loader(path, batch=16, seed=4, hflip=False)
    drawn_flips = 0
    for step in range(4):
        positions = flipped.order.rank_positions(step)
        eps, flips = draw_noise_and_flips(4, flipped.order.epoch(step), positions, (4, 4, 4))
        drawn_flips += int(flips.sum())
        image = torch.from_numpy(moments[positions, 0].astype(np.float32))
        (with_flips, _), (latents, _) = next(flipped), next(unflipped)
        torch.testing.assert_close(latents, image[:, :4] + 0.5 * eps, rtol=0, atol=0)
        assert torch.equal(latents[~torch.from_numpy(flips)], with_flips[~torch.from_numpy(flips)])
    assert drawn_flips > 0  # the default loader did take flipped images where these are not


def test_mds_and_webdataset_give_the_same_sequence(noisy_datasets):
    a, b = loader(noisy_datasets["mds"], "mds"), loader(noisy_datasets["webdataset"], "webdataset")
    for (xa, ya), (xb, yb) in zip(take(a, 6), take(b, 6)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_resume_mid_epoch_continues_the_exact_sequence_on_another_world_size(noisy_datasets):
    path = noisy_datasets["mds"]
    reference = take(loader(path, batch=16), 7)  # 4 steps per epoch: the resumed part crosses an epoch

    first = loader(path, batch=16, workers=2)
    take(first, 3)
    state = json.loads(json.dumps(first.state_dict()))  # what the checkpoint stores
    assert state["step"] == 3 and state["epoch"] == 0 and len(json.dumps(state)) < 200

    ranks = [loader(path, batch=16, rank=r, world=2, workers=w) for r, w in ((0, 2), (1, 0))]
    for rank in ranks:
        rank.load_state_dict(state)
    for step in range(3, 7):
        (x0, y0), (x1, y1) = next(ranks[0]), next(ranks[1])
        assert torch.equal(torch.cat([x0, x1]), reference[step][0])
        assert torch.equal(torch.cat([y0, y1]), reference[step][1])
    assert ranks[0].state_dict()["step"] == 7 and ranks[0].epoch == 1


def test_loading_a_state_restarts_an_iterator_already_running(noisy_datasets):
    path = noisy_datasets["webdataset"]
    reference = take(loader(path, "webdataset", workers=2), 4)
    it = loader(path, "webdataset", workers=2)
    take(it, 3)
    it.load_state_dict({**it.state_dict(), "step": 1})
    assert all(torch.equal(next(it)[0], reference[s][0]) for s in (1, 2, 3))


def test_a_state_from_another_run_setup_is_refused(noisy_datasets):
    state = loader(noisy_datasets["mds"], batch=16).state_dict()
    with pytest.raises(ShardDataError, match="global_batch_size=16.*resume with those"):
        loader(noisy_datasets["mds"], batch=32).load_state_dict(state)


def test_wrong_format_or_missing_dataset_is_a_clear_error(noisy_datasets, tmp_path):
    with pytest.raises(ShardDataError, match="set data.format=mds"):
        loader(noisy_datasets["mds"], "webdataset")
    with pytest.raises(ShardDataError, match="dtr-prep digits"):
        loader(str(tmp_path / "nothing"))


def test_the_prefetcher_hands_out_the_same_batches_and_resumes_at_the_batch_it_handed_out(identity_datasets):
    from dtr_scale.data.loader import DevicePrefetcher

    path = identity_datasets["mds"]
    plain = take(loader(path, batch=20), 6)
    ahead = DevicePrefetcher(loader(path, batch=20), "cpu")
    first = take(ahead, 3)
    assert ahead.loader.step == 4  # one batch fetched ahead ...
    state = ahead.state_dict()
    assert state["step"] == 3  # ... but the position is that of the batches handed out
    resumed = DevicePrefetcher(loader(path, batch=20), "cpu")
    resumed.load_state_dict(state)
    for got, want in zip(first + take(resumed, 3), plain):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
