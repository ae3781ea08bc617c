import json
import threading

import numpy as np
import pytest
import torch

from dtr_scale.data.latents import draw_noise_and_flips
from dtr_scale.data.loader import build_shard_loader, read_manifest
from dtr_scale.data.readers import open_reader
from dtr_scale.data.shard_format import ShardDataError


def loader(path, fmt="mds", batch=16, rank=0, world=1, seed=0, workers=0, hflip=True, read_threads=8):
    return build_shard_loader(path, format=fmt, global_batch_size=batch, rank=rank, world_size=world, seed=seed,
                              num_workers=workers, hflip=hflip, read_threads=read_threads)


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
def test_read_threads_and_workers_do_not_change_the_batches(noisy_datasets, fmt, monkeypatch):
    """A worker reads a batch's samples 8 at a time in threads: the batches are those read one by one, in
    the same order, whatever the number of workers."""
    path = noisy_datasets[fmt]
    serial = take(loader(path, fmt, read_threads=1), 6)  # 6 steps of 16 over 64 samples: into epoch 1
    reader_class = type(open_reader(path, read_manifest(path)))
    threads = set()
    real_read = reader_class.read
    monkeypatch.setattr(reader_class, "read", lambda self, p: threads.add(threading.current_thread().name)
                        or real_read(self, p))
    for workers in (0, 2):
        threaded = take(loader(path, fmt, workers=workers, read_threads=8), 6)
        for step, ((xs, ys), (xt, yt)) in enumerate(zip(serial, threaded)):
            assert torch.equal(xs, xt) and torch.equal(ys, yt), (workers, step)
    assert len({name for name in threads if name.startswith("shard-read")}) > 1  # read concurrently here


def test_threaded_reads_keep_each_sample_in_its_place(identity_datasets):
    it = loader(identity_datasets["mds"], batch=40, read_threads=8)
    for step in range(6):
        latents, labels = next(it)
        positions = torch.tensor(it.order.rank_positions(step))
        assert torch.equal(sample_ids(latents), positions) and torch.equal(labels, positions % 10)


def test_read_threads_come_from_the_config_and_a_negative_count_is_refused(identity_datasets):
    from dtr_scale.config import ConfigError, to_train_config
    from dtr_scale.train.components import build_loader

    data = {"kind": "shards", "path": identity_datasets["mds"]}
    cfg = to_train_config({"data": {**data, "read_threads": 3}, "global_batch_size": 8})
    assert build_loader(cfg, rank=0, world_size=1).read_threads == 3
    assert to_train_config({"data": data}).data.read_threads == 8
    with pytest.raises(ConfigError, match=r"data.read_threads: got -1; must be >= 0 \(0 or 1: read the samples"):
        to_train_config({"data": {**data, "read_threads": -1}})


def test_read_threads_per_dataset_preset_and_on_the_command_line():
    from hydra import compose, initialize_config_dir

    from dtr_scale.config import to_train_config
    from dtr_scale.configs import CONFIG_DIR

    def composed(*overrides):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return to_train_config(compose(config_name="train", overrides=["run_dir=/tmp/unused", *overrides]))

    # ImageNet's shards exceed the page cache: 8 reads in flight per worker; the digits are always cached
    assert composed("data=imagenet256").data.read_threads == 8
    assert composed("data=digits").data.read_threads == 0
    assert composed("data=imagenet256", "data.read_threads=2").data.read_threads == 2


def test_latents_are_fresh_posterior_draws_of_image_or_flip(noisy_datasets):
    path = noisy_datasets["mds"]
    manifest = read_manifest(path)
    reader = open_reader(path, manifest)
    moments = np.stack([reader.read(i)[0] for i in range(64)])
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
    reader = open_reader(path, read_manifest(path))
    moments = np.stack([reader.read(i)[0] for i in range(64)])
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
