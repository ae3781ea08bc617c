"""The training data loader: per-rank batches of fresh latents from prepared shards, forever, resumable.

    loader = build_shard_loader("data/digits", format="mds", global_batch_size=256, rank=r, world_size=w, seed=0)
    latents, labels = next(loader)        # float32 [256 / w, C, h, w] (already times scale_factor), int64 [256 / w]
    state = loader.state_dict()           # {"step": ..., ...}: save it with the checkpoint
    loader.load_state_dict(state)         # continue the exact sequence, on any world size with the same global batch

Order (order.py): global step s reads a fixed set of samples from (seed, s, global batch); rank r reads the
r-th slice. Both formats are read by random access, so MDS and webdataset give the same sequence: the
webdataset library's own streaming pipeline (shard shuffle + shuffle buffer) is NOT used for training,
because its order changes with the number of ranks and workers and it cannot resume mid-epoch.
Workers: worker w of n builds the batches of steps start + w, start + w + n, ...; torch's DataLoader hands
them back round-robin, i.e. in step order, so the sequence does not depend on num_workers either.
Random access assumes the shards sit on a filesystem with a page cache (node-local disk is fastest).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dtr_scale.data.latents import draw_noise_and_flips, sample_latents
from dtr_scale.data.order import BatchOrder
from dtr_scale.data.readers import open_reader
from dtr_scale.data.shard_format import FORMATS, ShardDataError, read_manifest

__all__ = ["ShardLoader", "build_shard_loader", "read_manifest", "load_batch"]

STATE_VERSION = 1


def load_batch(reader, positions: np.ndarray, *, epoch: int, seed: int, manifest: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents float32 [B, C, h, w], labels int64 [B]) for the samples at these positions in this epoch."""
    rows = [reader.read(p) for p in positions.tolist()]
    moments = np.stack([m for m, _ in rows])
    labels = torch.tensor([label for _, label in rows], dtype=torch.int64)
    eps, flips = draw_noise_and_flips(seed, epoch, positions, tuple(manifest["latent_shape"]))
    return sample_latents(moments, flips, eps, manifest["scale_factor"]), labels


class _RankBatches(IterableDataset):
    """This rank's batches from `start_step` on, split across DataLoader workers by step."""

    def __init__(self, root: str, manifest: dict, order: BatchOrder, start_step: int) -> None:
        self.root, self.manifest, self.order, self.start_step = root, manifest, order, start_step

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        reader = open_reader(self.root, self.manifest)  # opened here: one per worker process
        for step in itertools.count(self.start_step + worker_id, num_workers):
            yield load_batch(reader, self.order.rank_positions(step), epoch=self.order.epoch(step),
                             seed=self.order.seed, manifest=self.manifest)


class ShardLoader:
    """An endless iterator of this rank's batches; its position is the number of global steps consumed."""

    def __init__(self, root: str, manifest: dict, order: BatchOrder, num_workers: int = 0) -> None:
        self.root, self.manifest, self.order, self.num_workers = root, manifest, order, num_workers
        self.step = 0
        self._batches = None

    @property
    def epoch(self) -> int:
        return self.order.epoch(self.step)

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch

    def __iter__(self) -> ShardLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            stream = _RankBatches(self.root, self.manifest, self.order, self.step)
            # Workers prefetch ahead; `step` counts only the batches handed out, so the state stays exact.
            self._batches = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers))
        batch = next(self._batches)
        self.step += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes; the next batch starts new ones at the current step."""
        self._batches = None

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "step": self.step, "epoch": self.epoch, "seed": self.order.seed,
                "global_batch_size": self.order.global_batch_size, "num_samples": self.order.num_samples}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch_size", "num_samples"):
            if state[key] != getattr(self.order, key):
                raise ShardDataError(
                    f"loader state has {key}={state[key]} but this loader has {getattr(self.order, key)}; "
                    "the saved position only means the same thing with the same seed, global batch and "
                    "dataset, so resume with those (the world size may differ)")
        self.close()
        self.step = int(state["step"])


def build_shard_loader(path: str, *, format: str, global_batch_size: int, rank: int, world_size: int,
                       seed: int, num_workers: int = 0) -> ShardLoader:
    """The loader of the prepared dataset at `path` (a directory with manifest.json)."""
    manifest = read_manifest(path)
    if format not in FORMATS:
        raise ShardDataError(f"data.format={format!r} is not one of {', '.join(FORMATS)}")
    if manifest["format"] != format:
        raise ShardDataError(f"data.format={format} but the shards at {path} are {manifest['format']}; "
                             f"set data.format={manifest['format']}")
    order = BatchOrder(manifest["num_samples"], global_batch_size, rank, world_size, seed)
    # Opening a reader here checks the shards against the manifest now, and imports the format's library
    # once in this process instead of once in every worker.
    open_reader(path, manifest)
    return ShardLoader(path, manifest, order, num_workers)
