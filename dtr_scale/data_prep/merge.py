"""Join finished chunks into one dataset: check completeness, write the MDS index, report and manifest.

manifest.json is written last: a dataset directory is complete exactly when it has one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile

import numpy as np

from dtr_scale.data_prep.layout import (CHUNK_META, PREP_NAME, REPORT_NAME, PrepError, chunk_dir, chunk_is_done,
                                        chunk_ranges, parts_of_chunks, write_json_atomic)
from dtr_scale.data_prep.prepare import record_sha256
from dtr_scale.data.integrity import (SAMPLE_HASH_SUFFIX, hash_into, record_verified, sample_hash_path, shard_files,
                                      update_mark)
from dtr_scale.data.shard_format import MANIFEST_NAME, TAR_SHARD_NAME, file_sha256, read_manifest, tar_index_path
from dtr_scale.data_prep.writers import write_mds_sample_hashes, write_tar_sample_hashes
from dtr_scale.io import fsync_dir, read_json

log = logging.getLogger(__name__)


@contextlib.contextmanager
def routine_warnings_hidden(*logger_names: str):
    """merge_index reports routine steps (a temporary folder, writing into an existing directory) as warnings."""
    def keep(record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING

    loggers = [logging.getLogger(name) for name in logger_names]
    for logger in loggers:
        logger.addFilter(keep)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(keep)


def _spans(numbers: list[int]) -> str:
    """'3-5, 9' for [3, 4, 5, 9]."""
    spans, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            spans.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(spans)


def missing_chunks_message(out: str, missing: list[int], num_chunks: int) -> str:
    markers = os.listdir(os.path.join(out, "parts")) if os.path.isdir(os.path.join(out, "parts")) else []
    splits = sorted({int(m.group(1)) for m in (re.match(r"part-\d+-of-(\d+)\.json$", n) for n in markers) if m})
    message = f"{out} is incomplete: chunks {_spans(missing)} of {num_chunks} are not finished"
    if splits:
        n = splits[-1]
        parts = parts_of_chunks(missing, num_chunks, n)
        message += (f"; with --num-parts {n} they belong to part(s) {_spans(parts)}: rerun those (e.g. "
                    f"--part {parts[0]} --num-parts {n}) or resubmit the whole array job, finished parts are skipped")
    return message + "; then run `dtr-prep merge` again"


def build_report(prep: dict, metas: list[dict]) -> dict:
    skipped = [s for m in metas for s in m["skipped"]]
    converted = [c for m in metas for c in m["converted"]]
    by_reason: dict[str, int] = {}
    for s in skipped:
        by_reason[s["reason"]] = by_reason.get(s["reason"], 0) + 1
    return {"source": prep["source"], "num_source_images": prep["num_items"],
            "num_samples": sum(m["samples"] for m in metas), "empty_class_folders": prep.get("empty_classes", []),
            "skipped_by_reason": by_reason,
            "skipped": skipped, "converted": converted}


def build_manifest(prep: dict, metas: list[dict]) -> dict:
    counts = [0] * len(prep["classes"])
    for m in metas:
        for label, n in m["count_per_class"].items():
            counts[int(label)] += n
    keys = ("format", "autoencoder", "resolution", "scale_factor", "latent_shape", "stored_shape", "dtype",
            "classes", "source", "listing_sha256")
    return {"version": 1, **{k: prep[k] for k in keys},
            "stored_layout": "moments[2 (image, hflip), 2C (posterior mean, std; unscaled), h, w]",
            "num_samples": sum(counts), "num_classes": len(counts), "count_per_class": counts,
            "num_source_images": prep["num_items"], "num_skipped": sum(len(m["skipped"]) for m in metas),
            "shards": [manifest_shard(m, s) for m in metas for s in m["shards"]]}


def manifest_shard(meta: dict, shard: dict) -> dict:
    """A shard's manifest entry: path, samples, sha256, and for a tar the sha256 of its offset index."""
    index = os.path.basename(tar_index_path(shard["path"]))
    return {**shard, "index_sha256": meta["files"][index]} if index in meta["files"] else shard


def merge_mds_index(out: str, num_chunks: int) -> None:
    """OUT/index.json over every chunk's index, replaced atomically: streaming's merge_index refuses to
    overwrite an index, so it writes into a fresh directory and the result is renamed over the old one
    (a rerun on a finished output rewrites the same index)."""
    from streaming.base.util import merge_index

    staging = tempfile.mkdtemp(prefix=".index-merge.tmp-", dir=out)
    try:
        with routine_warnings_hidden("", "streaming.base.storage.upload"):
            merge_index([os.path.join(chunk_dir(out, c), "index.json") for c in range(num_chunks)], staging)
        os.chmod(os.path.join(staging, "index.json"), 0o644)
        os.replace(os.path.join(staging, "index.json"), os.path.join(out, "index.json"))
        fsync_dir(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def merge(out: str) -> dict:
    """Check every chunk is finished and consistent, then write index.json (MDS), report.json, manifest.json."""
    prep_path = os.path.join(out, PREP_NAME)
    if not os.path.isfile(prep_path):
        raise PrepError(f"no {PREP_NAME} in {out}: nothing was prepared there yet (run `dtr-prep images` first)")
    prep = read_json(prep_path)
    num_chunks = len(chunk_ranges(prep["num_items"], prep["shard_size"]))
    missing = [c for c in range(num_chunks) if not chunk_is_done(out, c)]
    if missing:
        raise PrepError(missing_chunks_message(out, missing, num_chunks))
    metas = [read_json(os.path.join(chunk_dir(out, c), CHUNK_META)) for c in range(num_chunks)]
    expected = record_sha256(prep)
    stale = [m["chunk"] for m in metas if m["prep_sha256"] != expected]
    if stale:
        raise PrepError(f"chunks {_spans(stale)} in {out} were written with other settings than {PREP_NAME}; "
                        "delete those chunk directories and rerun their parts")
    if prep["format"] == "mds":
        merge_mds_index(out, num_chunks)
    report = build_report(prep, metas)
    write_json_atomic(os.path.join(out, REPORT_NAME), report)
    manifest = build_manifest(prep, metas)
    if manifest["num_samples"] == 0:
        raise PrepError(f"every image of {prep['source']} was skipped (see {os.path.join(out, REPORT_NAME)})")
    write_json_atomic(os.path.join(out, MANIFEST_NAME), manifest)
    log.info("merged %s: %d samples in %d shards, %d images skipped %s", out, manifest["num_samples"],
             len(manifest["shards"]), manifest["num_skipped"], report["skipped_by_reason"])
    if report["empty_class_folders"]:
        log.warning("%s: class folder(s) without images, left out of the labels: %s (listed in %s)", out,
                    ", ".join(report["empty_class_folders"][:10]), os.path.join(out, REPORT_NAME))
    return manifest


def verify(out: str) -> list[str]:
    """Rehash every shard file against the manifest (the verified mark is rewritten: intact files marked,
    damaged ones dropped); the shards that do not match (empty when the dataset is intact)."""
    manifest = read_manifest(out)
    bad: list[str] = []
    files = [f for entry in manifest["shards"] for f in shard_files(entry)]
    update_mark(out, lambda marked: bad.extend(hash_into(out, marked, files, again=True)))
    return [entry["path"] for entry in manifest["shards"] if {p for p, _ in shard_files(entry)} & set(bad)]


def add_sample_hashes(out: str) -> int:
    """Give a dataset prepared before per-sample hashes existed its `<shard>.xxh3.npy` files (run after
    `verify` found it intact): chunk.json records them and merge rewrites the manifest. The chunks changed."""
    manifest = read_manifest(out)
    chunks = sorted({os.path.dirname(e["path"]) for e in manifest["shards"] if "sample_hashes_sha256" not in e})
    for chunk in chunks:
        directory = os.path.join(out, chunk)
        if manifest["format"] == "mds":
            write_mds_sample_hashes(directory)
        else:
            tar = os.path.join(directory, TAR_SHARD_NAME)
            write_tar_sample_hashes(tar, np.load(tar_index_path(tar), allow_pickle=False))
        meta = read_json(os.path.join(directory, CHUNK_META))
        for shard in meta["shards"]:
            name = os.path.basename(sample_hash_path(shard["path"]))
            meta["files"][name] = shard["sample_hashes_sha256"] = file_sha256(os.path.join(directory, name))
            shard["bytes"] = os.path.getsize(os.path.join(out, shard["path"]))
        write_json_atomic(os.path.join(directory, CHUNK_META), meta)
        record_verified(out, [(f"{chunk}/{name}", sha256) for name, sha256 in meta["files"].items()
                              if name.endswith(SAMPLE_HASH_SUFFIX)])
    merge(out)
    return len(chunks)
