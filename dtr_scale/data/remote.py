"""A prepared dataset in object storage (`data.remote=s3://bucket/prefix`, gs://, any scheme mosaicml-streaming
downloads), fetched file by file into `data.path`, the node-local cache.

    remote/manifest.json, remote/index.json          fetched when the loader is built: bad input stops there
    remote/chunk-000123/shard.00000.mds (+ .xxh3.npy) fetched on the first read of one of its samples

The transfer is streaming's own (`CloudDownloader`, which reads S3_ENDPOINT_URL and the usual AWS/GCS
credentials); the order, resume and integrity checks are those of a local dataset, because once fetched it is
one: a fetched shard is hashed against the manifest before its first sample is used (integrity.py), and one
that does not match is removed from the cache again so that the next start fetches it anew.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import urllib.parse
from collections.abc import Callable, Iterator

from dtr_scale.data.shard_format import MANIFEST_NAME, ShardDataError, read_manifest

FETCH_TIMEOUT_S = 60.0
MDS_INDEX = "index.json"


def remote_url(remote: str, relpath: str) -> str:
    return f"{remote.rstrip('/')}/{relpath}"


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """One fetch of a file at a time on this node: streaming's downloaders for some stores write a fixed
    temporary name, which two workers must not share."""
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def quiet_store_clients() -> None:
    """botocore logs at INFO what a run's console need not show (`Found credentials in environment
    variables.`, once per process that fetches); its warnings and errors still come through. A level
    the user gave botocore's logger is kept."""
    botocore = logging.getLogger("botocore")
    if botocore.level == logging.NOTSET:
        botocore.setLevel(logging.WARNING)


@functools.cache
def downloader(scheme: str, endpoint: str | None, pid: int) -> Callable[[str, str, float], None]:
    """streaming's download of one object for one store, its client made once per process and endpoint (a
    client costs ~0.1 s to build) and never shared with a forked loader worker, which gets its own (`pid`)."""
    quiet_store_clients()
    try:
        from streaming.base.storage.download import CloudDownloader  # heavy import, only for remote datasets
    except ImportError:  # older mosaicml-streaming: one function that builds a client per call
        from streaming.base.storage import download_file

        return download_file
    return CloudDownloader.get(f"{scheme}://").download


def download(remote: str, root: str, relpath: str, local: str) -> None:
    """Fetch one object to `local` (written to a temporary name and renamed by streaming's downloader);
    ShardDataError naming the object, the cache and what to check when the store cannot be reached or lacks it."""
    url = remote_url(remote, relpath)
    endpoint = os.environ.get("S3_ENDPOINT_URL")
    try:
        downloader(urllib.parse.urlparse(url).scheme, endpoint, os.getpid())(url, local, FETCH_TIMEOUT_S)
    # Each store's client raises its own types (botocore, google-cloud-storage, ...) and streaming re-raises
    # them as they are, so the boundary catches them all; the cause is chained and its text quoted.
    except Exception as err:
        via = f" through S3_ENDPOINT_URL={endpoint}" if url.startswith("s3://") and endpoint else ""
        raise ShardDataError(f"cannot fetch {url}{via} into the cache {root} ({type(err).__name__}: {err}); check that "
                             "data.remote names the prefix the dataset was uploaded to (it must hold "
                             f"{MANIFEST_NAME}), that the store is reachable from this node and that the "
                             "credentials may read it") from err


class Fetcher:
    """`fetch(relpath)`: the file of the remote dataset at `relpath`, present in the cache `root` afterwards.
    Picklable (plain strings), so every loader worker has its own."""

    def __init__(self, remote: str, root: str) -> None:
        self.remote, self.root = remote, root

    def url(self, relpath: str) -> str:
        return remote_url(self.remote, relpath)

    def __call__(self, relpath: str) -> None:
        local = os.path.join(self.root, relpath)
        if os.path.exists(local):
            return
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with file_lock(local):
            if not os.path.exists(local):  # another worker of this node fetched it while this one waited
                download(self.remote, self.root, relpath, local)


def fetch_dataset_files(remote: str, root: str) -> dict:
    """Fetch the remote dataset's manifest (and MDS index) into the cache `root` and return the manifest.

    Fetched anew at every start: a cache that already holds another version of the dataset is an error, not
    something to mix with the new one.
    """
    os.makedirs(root, exist_ok=True)
    manifest = _fetch_fresh(remote, root, MANIFEST_NAME)
    if manifest.get("format") == "mds":
        _fetch_fresh(remote, root, MDS_INDEX)
    return read_manifest(root)


def _fetch_fresh(remote: str, root: str, name: str) -> dict:
    local = os.path.join(root, name)
    fresh = os.path.join(root, f".{name}.fetched-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.remove(fresh)
    download(remote, root, name, fresh)
    try:
        with open(fresh, "rb") as f:
            new = f.read()
        if os.path.exists(local):
            with open(local, "rb") as f:
                if f.read() != new:
                    raise ShardDataError(
                        f"the cache {root} holds another version of the dataset than {remote_url(remote, name)} "
                        f"(their {name} differ); point data.path at an empty directory for this dataset, or "
                        f"empty {root}")
        os.replace(fresh, local)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(fresh)
    return read_manifest(local) if name == MANIFEST_NAME else {}
