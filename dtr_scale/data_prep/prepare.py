"""Encode one part of a source listing into finished chunks of latent shards.

For every image: ADM center crop, encode it and its horizontal flip, store the posterior moments
(dtr_scale.data_prep.writers, layout in dtr_scale.data.shard_format). Images are decoded by DataLoader workers and
encoded in batches on the autoencoder's device. A chunk is written under a temporary name and renamed when
complete, so an interrupted run loses at most the chunks it was writing and a rerun redoes exactly those.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dtr_scale.models.autoencoders import Autoencoder
from dtr_scale.data_prep.images import DEFAULT_MAX_PIXELS, BadImage, prepare_image
from dtr_scale.data_prep.layout import (CHUNK_META, PREP_NAME, PrepError, check_output_dir, chunk_dir, chunk_is_done,
                                        chunk_name, chunk_ranges, part_chunks, part_marker, stale_tmp_dirs,
                                        tmp_chunk_dir, write_json_atomic)
from dtr_scale.data_prep.sources import ArraySource, FolderSource, listing_sha256
from dtr_scale.data_prep.writers import open_chunk_writer
from dtr_scale.data.integrity import record_verified, sample_hash_path
from dtr_scale.data.shard_format import FORMATS, file_sha256
from dtr_scale.io import read_json

log = logging.getLogger(__name__)

STORAGE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class PrepSettings:
    format: str = "mds"
    resolution: int = 256
    dtype: str = "float16"  # storage dtype of the moments
    shard_size: int = 1024  # source images per chunk, the unit of resume
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped as "huge"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise PrepError(f"format {self.format!r} is not one of {', '.join(FORMATS)}")
        if self.dtype not in STORAGE_DTYPES:
            raise PrepError(f"dtype {self.dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
        if self.resolution < 1 or self.shard_size < 1 or self.max_pixels < 1:
            raise PrepError("resolution, shard_size and max_pixels must be positive")


def prep_record(source: FolderSource | ArraySource, autoencoder: Autoencoder, settings: PrepSettings) -> dict:
    """Everything that fixes the content of the chunks; every part must write under the same record."""
    c, h, w = autoencoder.latent_shape(settings.resolution)
    return {"version": 1, "source": source.name, "num_items": len(source), "classes": source.classes,
            "empty_classes": source.empty_classes, "listing_sha256": listing_sha256(source), "autoencoder": autoencoder.id,
            "scale_factor": autoencoder.scale_factor, "latent_shape": [c, h, w], "stored_shape": [2, 2 * c, h, w],
            **asdict(settings)}


# Describe the source, not the chunks' content: the path may differ between machines that mount the same
# data (the listing hash covers it), and empty folders add nothing to the listing.
SOURCE_ONLY = ("source", "empty_classes")


def record_sha256(record: dict) -> str:
    same = {k: v for k, v in record.items() if k not in SOURCE_ONLY}
    return hashlib.sha256(json.dumps(same, sort_keys=True).encode()).hexdigest()


def claim_output(out: str, record: dict) -> None:
    """Write prep.json, or check that an existing one (from another part or an earlier run) agrees."""
    path = os.path.join(out, PREP_NAME)
    if os.path.exists(path):
        old = read_json(path)
        changed = sorted(k for k in set(old) | set(record) if k not in SOURCE_ONLY and old.get(k) != record.get(k))
        if changed:
            raise PrepError(f"{out} holds data prepared with other settings ({', '.join(changed)} differ, e.g. "
                            f"{changed[0]}: {str(old.get(changed[0]))[:80]} != {str(record.get(changed[0]))[:80]}); "
                            "use a new output directory, or the same source and settings to resume")
        return
    write_json_atomic(path, record)


def encode_with_flip(autoencoder: Autoencoder, images: np.ndarray) -> np.ndarray:
    """float32 [n, 2, 2C, h, w] moments (image | flip, mean | std) of uint8 images [n, H, W, 3]."""
    x = torch.from_numpy(images)
    mean, std = autoencoder.encode(torch.cat([x, x.flip(2)]))
    moments = torch.cat([mean, std], dim=1)
    n = len(images)
    return torch.stack([moments[:n], moments[n:]], dim=1).numpy()


class Decoded(NamedTuple):
    index: int
    image: np.ndarray | None
    skipped: tuple[str, str] | None  # (reason, detail)
    converted: str | None  # source mode


class DecodedImages(Dataset):
    """Source position -> Decoded; runs in DataLoader workers."""

    def __init__(self, source: FolderSource | ArraySource, resolution: int, max_pixels: int) -> None:
        self.source, self.resolution, self.max_pixels = source, resolution, max_pixels

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Decoded:
        try:
            image, converted = prepare_image(self.source.open(i), self.resolution, self.max_pixels)
        except BadImage as bad:
            return Decoded(i, None, (bad.reason, bad.detail), None)
        return Decoded(i, image, None, converted)


def as_list(batch: list) -> list:
    return batch


class ChunkInProgress:
    """One chunk being written into its temporary directory; `finish` makes it visible."""

    def __init__(self, out: str, chunk: int, record: dict, source: FolderSource | ArraySource) -> None:
        self.out, self.chunk, self.record, self.source = out, chunk, record, source
        self.tmp = tmp_chunk_dir(out, chunk)
        self.writer = open_chunk_writer(record["format"], self.tmp, tuple(record["stored_shape"]), record["dtype"])
        self.count_per_class: dict[int, int] = {}
        self.skipped: list[dict] = []
        self.converted: list[dict] = []
        self.images = 0
        self.started = time.perf_counter()

    def add(self, batch: list[Decoded], autoencoder: Autoencoder) -> None:
        self.images += len(batch)
        for item in batch:
            if item.skipped is not None:
                reason, detail = item.skipped
                self.skipped.append({"index": item.index, "source": self.source.keys[item.index],
                                     "reason": reason, "detail": detail})
                log.warning("skipped %s (%s: %s)", self.source.keys[item.index], reason, detail)
            elif item.converted is not None:
                self.converted.append({"index": item.index, "source": self.source.keys[item.index],
                                       "from_mode": item.converted})
        good = [item for item in batch if item.image is not None]
        if not good:
            return
        moments = encode_with_flip(autoencoder, np.stack([item.image for item in good])).astype(self.record["dtype"])
        for item, m in zip(good, moments):
            label = int(self.source.labels[item.index])
            self.writer.write(m, label, item.index, self.source.keys[item.index])
            self.count_per_class[label] = self.count_per_class.get(label, 0) + 1

    def finish(self) -> dict:
        shards = self.writer.close()
        files = sorted(os.listdir(self.tmp))
        sums = {name: file_sha256(os.path.join(self.tmp, name)) for name in files}
        name = chunk_name(self.chunk)
        meta = {"chunk": self.chunk, "prep_sha256": record_sha256(self.record),
                "samples": sum(self.count_per_class.values()),
                "count_per_class": {str(k): v for k, v in sorted(self.count_per_class.items())},
                "skipped": self.skipped, "converted": self.converted, "files": sums,
                "shards": [{"path": f"{name}/{s['path']}", "samples": s["samples"], "sha256": sums[s["path"]],
                            "bytes": os.path.getsize(os.path.join(self.tmp, s["path"])),
                            "sample_hashes_sha256": sums[os.path.basename(sample_hash_path(s["path"]))]}
                           for s in shards if s["samples"] > 0]}
        write_json_atomic(os.path.join(self.tmp, CHUNK_META), meta)
        if chunk_is_done(self.out, self.chunk):
            # Another run of the same part (a resubmitted job) finished it first; its bytes are the same.
            shutil.rmtree(self.tmp)
        else:
            os.rename(self.tmp, chunk_dir(self.out, self.chunk))
            # These sums of the bytes just written are the dataset's one full verification: the verified
            # mark (integrity.py) spares the loaders a second pass while the files keep their size and mtime.
            record_verified(self.out, [(f"{name}/{f}", sums[f]) for f in files])
        seconds = time.perf_counter() - self.started
        log.info("%s: %d images -> %d samples in %.1f s (%.0f images/s)", name, self.images, meta["samples"],
                 seconds, self.images / max(seconds, 1e-9))
        return meta


def batches_of(ranges: list[range], chunks: list[int], batch_size: int) -> list[list[int]]:
    """Batches of listing positions that never straddle a chunk, so a redone chunk is encoded identically."""
    return [list(ranges[c][i:i + batch_size]) for c in chunks for i in range(0, len(ranges[c]), batch_size)]


def prepare(source: FolderSource | ArraySource, out: str, autoencoder: Autoencoder,
            settings: PrepSettings = PrepSettings(), *, part: int = 0, num_parts: int = 1, batch_size: int = 64,
            workers: int = 0, progress: bool = True) -> dict:
    """Encode the chunks of part `part` of `num_parts` that are not finished yet; returns the part's summary."""
    check_output_dir(out)
    record = prep_record(source, autoencoder, settings)
    ranges = chunk_ranges(len(source), settings.shard_size)
    mine = part_chunks(len(ranges), part, num_parts)
    claim_output(out, record)
    marker = part_marker(out, part, num_parts)
    todo = [c for c in mine if not chunk_is_done(out, c)]
    if not todo and os.path.exists(marker) and read_json(marker)["done"]:
        log.info("part %d of %d is already done (%s)", part, num_parts, marker)
        return read_json(marker)
    # Written before the work too, so that merge can say which part to rerun after a crash.
    write_json_atomic(marker, {"part": part, "num_parts": num_parts, "chunks": [mine.start, mine.stop], "done": False})
    for c in todo:  # left by an interrupted run of this part
        for stale in stale_tmp_dirs(out, c):
            shutil.rmtree(stale)
    log.info("part %d of %d: chunks %d-%d, %d to do (%d images)", part, num_parts, mine.start, mine.stop - 1,
             len(todo), sum(len(ranges[c]) for c in todo))
    _encode_chunks(source, out, autoencoder, record, ranges, todo, batch_size, workers, progress)
    metas = [read_json(os.path.join(chunk_dir(out, c), CHUNK_META)) for c in mine]
    summary = {"part": part, "num_parts": num_parts, "chunks": [mine.start, mine.stop], "done": True,
               "samples": sum(m["samples"] for m in metas), "skipped": sum(len(m["skipped"]) for m in metas)}
    write_json_atomic(marker, summary)
    log.info("part %d of %d done: %d samples, %d images skipped", part, num_parts, summary["samples"],
             summary["skipped"])
    return summary


def _encode_chunks(source, out, autoencoder, record, ranges, todo, batch_size, workers, progress) -> None:
    batches = batches_of(ranges, todo, batch_size)
    images = DecodedImages(source, record["resolution"], record["max_pixels"])
    loader = DataLoader(images, batch_sampler=batches, num_workers=workers, collate_fn=as_list)
    bar = tqdm(total=sum(len(b) for b in batches), unit="img", desc="encode", disable=not progress)
    chunk = None
    started = time.perf_counter()
    for batch in loader:
        c = batch[0].index // record["shard_size"]
        if chunk is None or chunk.chunk != c:
            if chunk is not None:
                chunk.finish()
            chunk = ChunkInProgress(out, c, record, source)
        chunk.add(batch, autoencoder)
        bar.update(len(batch))
    if chunk is not None:
        chunk.finish()
    bar.close()
    seconds = time.perf_counter() - started
    log.info("encoded %d images in %.1f s (%.0f images/s)", bar.n, seconds, bar.n / max(seconds, 1e-9))
