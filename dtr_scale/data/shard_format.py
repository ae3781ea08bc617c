"""What a prepared latent dataset holds on disk, shared by the writer (data_prep) and the loaders.

    DATASET/
      manifest.json          written last, by `dtr-prep merge`: the dataset is complete when it exists
      index.json             MDS only: the merged index over every chunk (streaming's merge_index)
      chunk-000000/          MDS: index.json + shard.00000.mds | webdataset: shard.tar + shard.tar.idx.npy

Every stored sample has
    moments  [2, 2C, h, w]  axis 0: the image, its horizontal flip; axis 1: posterior mean (C channels)
                            then posterior std (C channels), both UNSCALED (the loader applies scale_factor)
    label    int            class index
    index    int            position of the source image in the listing (manifest: listing_sha256)
    source   str            the source image's path relative to the source root
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from typing import TYPE_CHECKING

from dtr_scale.io import read_json

if TYPE_CHECKING:
    import numpy as np

MANIFEST_NAME = "manifest.json"
FORMATS = ("mds", "webdataset")
TAR_SHARD_NAME = "shard.tar"
# Webdataset keys: TarWriter stores sample field "moments.npy" as the member "<key>.moments.npy".
TAR_MOMENTS, TAR_LABEL, TAR_SOURCE = "moments.npy", "cls", "source.txt"


class ShardDataError(RuntimeError):
    """A prepared dataset that is missing, incomplete or does not match what was asked for."""


def mds_columns(stored_shape: tuple[int, ...], dtype: str) -> dict[str, str]:
    """MDS column encodings; the fixed-shape ndarray keeps every sample the same size."""
    shape = ",".join(str(d) for d in stored_shape)
    return {"moments": f"ndarray:{dtype}:{shape}", "label": "int64", "index": "int64", "source": "str"}


def tar_sample_key(index: int) -> str:
    return f"{index:09d}"


def tar_index_path(tar_path: str) -> str:
    return tar_path + ".idx.npy"


def build_tar_index(tar_path: str) -> np.ndarray:
    """int64 [n, 3]: (byte offset of the raw moments array, its byte length, label) per sample, in tar order.

    Tar has no index of its own; this one lets the loader read any sample with one seek and read, so webdataset
    shards follow the same global sample order as MDS (see loader.py).
    """
    import numpy as np  # here, not at the top: the launch checks read manifests on login nodes without it

    rows: dict[str, list[int]] = {}
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            key, _, field = member.name.partition(".")
            row = rows.setdefault(key, [-1, -1, -1])
            if field == TAR_MOMENTS:
                handle = tar.extractfile(member)
                major, _ = np.lib.format.read_magic(handle)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                read_header(handle)
                header = handle.tell()
                row[0], row[1] = member.offset_data + header, member.size - header
            elif field == TAR_LABEL:
                row[2] = int(tar.extractfile(member).read())
    index = np.array(list(rows.values()), dtype=np.int64).reshape(-1, 3)
    if (index < 0).any():
        raise ShardDataError(f"{tar_path}: a sample lacks its {TAR_MOMENTS} or {TAR_LABEL} member; "
                             "the shard is damaged, delete its chunk directory and rerun dtr-prep")
    return index


def read_manifest(path: str) -> dict:
    """The manifest of a prepared dataset directory (or of the manifest file itself)."""
    file = path if path.endswith(".json") else os.path.join(path, MANIFEST_NAME)
    if not os.path.isfile(file):
        raise ShardDataError(
            f"no {MANIFEST_NAME} at {path}: the dataset is not prepared or not merged. Prepare it with "
            f"`dtr-prep digits {path}` or `dtr-prep images SRC {path}`; after a SLURM array job run "
            f"`dtr-prep merge {path}`")
    return read_json(file)  # names the file if it does not parse


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes, the checksum prep records for every shard."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
