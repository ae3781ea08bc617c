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
Random access assumes the shards sit on a filesystem with a page cache (node-local disk is fastest). Where
the shards exceed it, each worker tells the kernel a whole batch's byte ranges before reading the first
(readers.read_extents), so the disk sees workers x batch reads at once, not one per worker.
With `remote` (s3://bucket/prefix, gs://...), `path` is the node-local cache the shards are fetched into
on their first read (remote.py); integrity is checked the same way for both (integrity.py).
The training loop wraps any loader in DevicePrefetcher (below): batches arrive on the GPU one step ahead.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dtr_scale.data.integrity import verify_dataset
from dtr_scale.data.latents import draw_noise_and_flips, sample_latents
from dtr_scale.data.order import BatchOrder
from dtr_scale.data.readers import open_reader
from dtr_scale.data.remote import Fetcher, fetch_dataset_files
from dtr_scale.data.shard_format import FORMATS, ShardDataError, read_manifest

__all__ = ["DevicePrefetcher", "ShardLoader", "build_shard_loader", "checked_manifest", "read_manifest", "load_batch"]

STATE_VERSION = 1


def load_batch(reader, positions: np.ndarray, *, epoch: int, seed: int, manifest: dict,
               hflip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents float32 [B, C, h, w], labels int64 [B]) for the samples at these positions in this epoch;
    with hflip=False always from the image itself (the noise draws stay the same)."""
    eps, flips = draw_noise_and_flips(seed, epoch, positions, tuple(manifest["latent_shape"]))
    moments, labels = reader.read_batch(positions)
    # Only the drawn view of each sample (image or flip) is copied out of the bytes read.
    views = moments[np.arange(len(positions)), flips.astype(np.intp) if hflip else 0]
    return sample_latents(views, eps, manifest["scale_factor"]), torch.from_numpy(labels)


class _RankBatches(IterableDataset):
    """This rank's batches from `start_step` on, split across DataLoader workers by step."""

    def __init__(self, root: str, manifest: dict, order: BatchOrder, start_step: int, hflip: bool,
                 fetch: Fetcher | None, marked: dict[str, dict] | None) -> None:
        self.root, self.manifest, self.order, self.start_step = root, manifest, order, start_step
        self.hflip, self.fetch, self.marked = hflip, fetch, marked

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (0, 1) if worker is None else (worker.id, worker.num_workers)
        reader = open_reader(self.root, self.manifest, self.fetch, self.marked)  # here: one per worker process
        for step in itertools.count(self.start_step + worker_id, num_workers):
            yield load_batch(reader, self.order.rank_positions(step), epoch=self.order.epoch(step),
                             seed=self.order.seed, manifest=self.manifest, hflip=self.hflip)


class ShardLoader:
    """An endless iterator of this rank's batches; its position is the number of global steps consumed."""

    def __init__(self, root: str, manifest: dict, order: BatchOrder, num_workers: int = 0,
                 hflip: bool = True, fetch: Fetcher | None = None, marked: dict[str, dict] | None = None) -> None:
        self.root, self.manifest, self.order, self.num_workers = root, manifest, order, num_workers
        self.hflip, self.fetch, self.marked = hflip, fetch, marked
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
            stream = _RankBatches(self.root, self.manifest, self.order, self.step, self.hflip, self.fetch, self.marked)
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


def checked_manifest(path: str, *, format: str, remote: str | None = None) -> dict:
    """The manifest of the dataset at `path` (or at `remote`, with `path` its cache) once the start's checks
    have passed: it exists, it is in `format`, and every shard present was hashed once for this dataset
    version (the ranks of a node take turns, the first does the work). A launch check calls this before
    anything is written; ShardDataError says what is wrong."""
    return checked_dataset(path, format=format, remote=remote)[0]


def checked_dataset(path: str, *, format: str, remote: str | None = None) -> tuple[dict, dict[str, dict]]:
    """checked_manifest's manifest, and the verified mark that its check left (integrity.verify_dataset)."""
    if format not in FORMATS:
        raise ShardDataError(f"data.format={format!r} is not one of {', '.join(FORMATS)}")
    manifest = fetch_dataset_files(remote, path) if remote else read_manifest(path)
    if manifest["format"] != format:
        raise ShardDataError(f"data.format={format} but the shards at {remote or path} are {manifest['format']}; "
                             f"set data.format={manifest['format']}")
    return manifest, verify_dataset(path, manifest, present_only=bool(remote))


def build_shard_loader(path: str, *, format: str, global_batch_size: int, rank: int, world_size: int,
                       seed: int, num_workers: int = 0, hflip: bool = True, remote: str | None = None) -> ShardLoader:
    """The loader of the prepared dataset at `path` (a directory with manifest.json), or of the one at
    `remote` with `path` as its local cache; hflip: draw the image or its stored horizontal flip per sample
    and epoch (DiT's augmentation)."""
    manifest, marked = checked_dataset(path, format=format, remote=remote)
    order = BatchOrder(manifest["num_samples"], global_batch_size, rank, world_size, seed)
    fetch = Fetcher(remote, path) if remote else None
    open_reader(path, manifest, fetch, marked)  # here: the format's library imported once, not once per worker
    return ShardLoader(path, manifest, order, num_workers, hflip, fetch, marked)


class DevicePrefetcher:
    """A loader's batches on `device`, one batch ahead: on CUDA the next batch is copied from
    pinned memory on a side stream while the current step runs (non-blocking), so the step
    finds it there. The position it reports and restores is that of the batches handed out,
    not of the one fetched ahead, so a checkpoint resumes at the exact batch."""

    def __init__(self, loader: Any, device: torch.device | str) -> None:
        self.loader, self.device = loader, torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ahead: tuple[tuple[torch.Tensor, ...], Any, dict] | None = None  # batch, copy event, position before it

    def __iter__(self) -> DevicePrefetcher:
        return self

    def _fetch(self) -> tuple[tuple[torch.Tensor, ...], Any, dict]:
        position = self.loader.state_dict()
        batch = next(self.loader)
        if self.stream is None:
            return tuple(t.to(self.device) for t in batch), None, position
        with torch.cuda.stream(self.stream):
            moved = tuple(t.pin_memory().to(self.device, non_blocking=True) for t in batch)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        return moved, copied, position

    def __next__(self) -> tuple[torch.Tensor, ...]:
        batch, copied, _ = self._ahead if self._ahead is not None else self._fetch()
        if copied is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copied)  # the device waits for the copy, the host does not
            for t in batch:
                t.record_stream(current)  # allocated on the side stream, used on this one
        self._ahead = self._fetch()
        return batch

    def state_dict(self) -> dict:
        return self._ahead[2] if self._ahead is not None else self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._ahead = None
        self.loader.load_state_dict(state)
