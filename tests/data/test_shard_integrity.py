"""A damaged shard stops the training loader with its name, the sample being read and what to do; it never
feeds wrong numbers or fails with a library's IndexError. The full hash is done once per dataset version
(at prep, or by the first start on a copy), the verified mark spares every later start and worker, and
bytes flipped in place after that are caught at the read of the damaged sample."""

import json
import multiprocessing
import os
import shutil

import numpy as np
import pytest

from dtr_scale.data import integrity
from dtr_scale.data.integrity import MARK_NAME, read_mark, sample_hash_path, shard_files
from dtr_scale.data.loader import build_shard_loader, checked_manifest
from dtr_scale.data.open_files import OpenFiles
from dtr_scale.data.shard_format import ShardDataError, read_manifest
from dtr_scale.data_prep.cli import main as prep_main

FORMATS = ("mds", "webdataset")
SAMPLE_BYTES = 2 * 8 * 4 * 4 * 2  # moments [2, 2C, h, w] fp16 of the 8 x 8 pixel-autoencoder latents


def copy_of(identity_datasets, fmt, tmp_path):
    """A copy of the 200-sample dataset (64-sample shards), file times and verified mark included."""
    return str(shutil.copytree(identity_datasets[fmt], tmp_path / fmt))


def shard_path(root, shard=1):
    return os.path.join(root, read_manifest(root)["shards"][shard]["path"])


def flip_a_byte(path, at=None):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2 if at is None else at)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))


def flip_keeping_mtime(path, at):
    """Damage that no stat can see: a byte flipped in place (the same file, which open descriptors see),
    the file's size and mtime kept."""
    stat = os.stat(path)
    flip_a_byte(path, at)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) * 2 // 3)


def loader(root, fmt, workers=0):
    return build_shard_loader(root, format=fmt, global_batch_size=40, rank=0, world_size=1, seed=0,
                              num_workers=workers)


def read_an_epoch(root, fmt, workers=0):
    it = loader(root, fmt, workers)
    for _ in range(it.steps_per_epoch):
        next(it)


def sample_offset(root, fmt, shard, index):
    """Byte offset of sample `index`'s moments inside the shard file."""
    path = shard_path(root, shard)
    if fmt == "webdataset":
        return int(np.load(path + ".idx.npy")[index, 0])
    with open(path, "rb") as f:  # MDS: uint32 count, then uint32 offsets of every sample (streaming's layout)
        offsets = np.frombuffer(f.read(4 * (index + 2)), np.uint32)
    return int(offsets[index + 1]) + 4  # after the one uint32 size of the variable-size column


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_shard_damaged_before_the_start_stops_the_loader_before_any_batch(identity_datasets, fmt, tmp_path):
    root = copy_of(identity_datasets, fmt, tmp_path)
    shard = shard_path(root)
    flip_a_byte(shard)  # a rewrite changes the mtime: the mark no longer covers the shard
    for start in (lambda: checked_manifest(root, format=fmt), lambda: loader(root, fmt)):  # a launch check, a rank
        with pytest.raises(ShardDataError, match=r"does not match the sha256 that manifest.json records") as err:
            start()
        assert shard in str(err.value) and f"dtr-prep verify {root}" in str(err.value)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_missing_shard_is_an_error_before_the_first_batch(identity_datasets, fmt, tmp_path):
    root = copy_of(identity_datasets, fmt, tmp_path)
    shard = shard_path(root, 3)
    os.remove(shard)
    with pytest.raises(ShardDataError, match=rf"shard {shard} is missing; run `dtr-prep verify {root}`"):
        checked_manifest(root, format=fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_truncated_shard_is_an_error_naming_the_shard_and_the_fix(identity_datasets, fmt, tmp_path):
    root = copy_of(identity_datasets, fmt, tmp_path)
    shard = shard_path(root)
    truncate(shard)
    with pytest.raises(ShardDataError) as err:
        loader(root, fmt)
    message = str(err.value)
    assert shard in message and "rerun `dtr-prep images`" in message
    assert f"({os.path.getsize(shard)} bytes)" in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_flipped_in_place_while_training_are_caught_at_the_read_of_that_sample(identity_datasets, fmt,
                                                                                     tmp_path):
    root = copy_of(identity_datasets, fmt, tmp_path)
    it = loader(root, fmt, workers=2)
    first = next(it)  # the workers have started and verified what they read; the epoch has begun
    assert first[0].shape == (40, 4, 4, 4)
    next(it)
    # Worker w read step w: each has made its first read of every shard (their one stat against the mark),
    # so the flip, which changes the mtime for a moment, cannot meet a first read.
    assert all(set(it.order.rank_positions(step) // 64) == {0, 1, 2, 3} for step in (0, 1))
    shard = shard_path(root, 2)
    damaged = 17  # sample 17 of shard 2 is global sample 2 * 64 + 17
    flip_keeping_mtime(shard, sample_offset(root, fmt, 2, damaged) + SAMPLE_BYTES // 3)
    with pytest.raises(ShardDataError, match="changed after it was verified") as err:
        for _ in range(3 * it.steps_per_epoch):  # read ahead: 2 batches a worker (torch's prefetch), < an epoch
            next(it)
    message = str(err.value)
    assert shard in message and f"sample {damaged} of the shard, global sample {2 * 64 + damaged}" in message
    assert f"dtr-prep verify {root}" in message
    # The shard left the mark, so the next start hashes it again and stops before training.
    assert read_manifest(root)["shards"][2]["path"] not in read_mark(os.path.join(root, MARK_NAME))
    with pytest.raises(ShardDataError, match="does not match the sha256"):
        loader(root, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_shard_cut_short_while_training_is_caught_at_the_read_of_a_lost_sample(identity_datasets, fmt, tmp_path):
    root = copy_of(identity_datasets, fmt, tmp_path)
    it = loader(root, fmt)
    next(it)
    shard = shard_path(root, 0)
    with open(shard, "r+b") as f:
        f.truncate(sample_offset(root, fmt, 0, 40))  # samples 40.. of shard 0 are gone
    with pytest.raises(ShardDataError, match=rf"{shard} changed after it was verified: .* \(sample "
                                             r"(4\d|5\d|6[0-3]) of the shard, global sample \1\)"):
        for _ in range(2 * it.steps_per_epoch):
            next(it)


@pytest.mark.parametrize("moved_to", ["16 bytes on", "past the end of the file"])
def test_an_mds_header_damaged_after_its_shard_was_verified_is_caught_at_the_read(identity_datasets, tmp_path,
                                                                                   moved_to):
    """The 8 header bytes that say where a sample lies are read with it; damaged in place, they move the
    sample (its bytes then fail their hash) or point past the file (nothing is read): named all the same."""
    root = copy_of(identity_datasets, "mds", tmp_path)
    it = loader(root, "mds")
    next(it)
    shard, index = shard_path(root, 1), 7
    at = 4 * (1 + index)  # where sample 7 begins, which is where sample 6 ends (streaming's layout)
    stat = os.stat(shard)
    with open(shard, "r+b") as f:
        f.seek(at)
        begin = int(np.frombuffer(f.read(4), np.uint32)[0])
        f.seek(at)
        f.write(np.uint32(begin + 16 if moved_to == "16 bytes on" else 2**31).tobytes())
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ShardDataError, match=rf"{shard} changed after it was verified: .* \(sample "
                                             r"(6 of the shard, global sample 70|7 of the shard, global sample 71)\)"):
        for _ in range(2 * it.steps_per_epoch):
            next(it)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_full_hash_runs_once_per_dataset_version_not_per_start(identity_datasets, fmt, tmp_path, monkeypatch):
    hashed = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path: hashed.append(path) or real(path))
    root = copy_of(identity_datasets, fmt, tmp_path)
    files = [os.path.join(root, p) for entry in read_manifest(root)["shards"] for p, _ in shard_files(entry)]
    read_an_epoch(root, fmt)  # prep's mark covers the copy: copytree keeps sizes and mtimes
    assert hashed == []

    os.remove(os.path.join(root, MARK_NAME))  # e.g. a copy made without the mark, or an old dataset
    read_an_epoch(root, fmt)
    read_an_epoch(root, fmt)  # a requeue
    assert sorted(hashed) == sorted(files)  # each file once, then never again
    mark = json.loads(open(os.path.join(root, MARK_NAME)).read())
    assert mark["version"] == 1 and set(mark["files"]) == {os.path.relpath(f, root) for f in files}


@pytest.mark.parametrize("fmt", FORMATS)
def test_prep_stores_a_hash_of_each_sample_as_the_reader_reads_it(identity_datasets, fmt):
    root = identity_datasets[fmt]
    for entry in read_manifest(root)["shards"]:
        hashes = np.load(sample_hash_path(os.path.join(root, entry["path"])), allow_pickle=False)
        assert hashes.dtype == np.uint64 and len(hashes) == entry["samples"] and len(set(hashes.tolist())) == len(hashes)
        assert entry["bytes"] == os.path.getsize(os.path.join(root, entry["path"]))


def test_a_dataset_without_sample_hashes_is_read_after_its_full_hash(identity_datasets, tmp_path, caplog):
    """Datasets prepared before per-sample hashes: checked in full once, then read without the per-sample
    check, with a warning that says how to add it."""
    root = copy_of(identity_datasets, "mds", tmp_path)
    manifest = read_manifest(root)
    for entry in manifest["shards"]:
        del entry["sample_hashes_sha256"], entry["bytes"]
        os.remove(sample_hash_path(os.path.join(root, entry["path"])))
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    os.remove(os.path.join(root, MARK_NAME))
    with caplog.at_level("WARNING"):
        read_an_epoch(root, "mds")
    assert "per-sample hashes" in caplog.text and "--add-sample-hashes" in caplog.text
    assert set(read_mark(os.path.join(root, MARK_NAME))) == {e["path"] for e in manifest["shards"]}


@pytest.mark.parametrize("fmt", FORMATS)
def test_prep_verify_lists_damaged_shards_and_drops_them_from_the_mark(identity_datasets, fmt, tmp_path, capsys):
    root = copy_of(identity_datasets, fmt, tmp_path)
    prep_main(["verify", root])
    assert "all shards match manifest.json" in capsys.readouterr().out
    relpath = read_manifest(root)["shards"][1]["path"]
    flip_keeping_mtime(os.path.join(root, relpath), 100)  # invisible to the mark, not to `verify`
    with pytest.raises(SystemExit) as exit_:
        prep_main(["verify", root])
    assert exit_.value.code == 1  # damage found by the check: a failure, not a usage error
    assert f"1 shard(s) in {root} do not match their checksum: {relpath}" in capsys.readouterr().err
    assert relpath not in read_mark(os.path.join(root, MARK_NAME))


@pytest.mark.parametrize("fmt", FORMATS)
def test_intact_shards_are_read_as_before(identity_datasets, fmt):
    read_an_epoch(identity_datasets[fmt], fmt)


def test_prep_verify_adds_sample_hashes_to_an_old_dataset_and_the_reads_are_then_checked(identity_datasets,
                                                                                           tmp_path, caplog):
    root = copy_of(identity_datasets, "webdataset", tmp_path)
    before = read_manifest(root)
    for chunk in sorted({os.path.dirname(e["path"]) for e in before["shards"]}):  # as an older prep left it
        meta_path = os.path.join(root, chunk, "chunk.json")
        meta = json.loads(open(meta_path).read())
        for shard in meta["shards"]:
            del shard["sample_hashes_sha256"], shard["bytes"]
            os.remove(sample_hash_path(os.path.join(root, shard["path"])))
        meta["files"] = {k: v for k, v in meta["files"].items() if not k.endswith(".xxh3.npy")}
        with open(meta_path, "w") as f:
            json.dump(meta, f)
    prep_main(["merge", root])
    assert not any("sample_hashes_sha256" in e for e in read_manifest(root)["shards"])

    prep_main(["verify", root, "--add-sample-hashes"])
    assert read_manifest(root)["shards"] == before["shards"]  # the same hashes a fresh prep writes
    with caplog.at_level("WARNING"):
        it = loader(root, "webdataset")
    assert "per-sample hashes" not in caplog.text
    flip_keeping_mtime(shard_path(root, 0), sample_offset(root, "webdataset", 0, 3) + 10)
    with pytest.raises(ShardDataError, match="sample 3 of the shard, global sample 3"):
        for _ in range(it.steps_per_epoch):
            next(it)


def test_ranks_starting_together_hash_each_file_once_between_them(identity_datasets, tmp_path, monkeypatch):
    """Four ranks of a node start at once on a dataset the mark does not cover: the first to take the mark's
    lock hashes, the others wait and find the files marked."""
    root = copy_of(identity_datasets, "mds", tmp_path)
    os.remove(os.path.join(root, MARK_NAME))
    log = tmp_path / "hashed.txt"
    real = integrity.file_sha256

    def logged(path):
        with open(log, "a") as f:
            f.write(path + "\n")
        return real(path)

    monkeypatch.setattr(integrity, "file_sha256", logged)  # inherited by the forked ranks
    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=loader, args=(root, "mds")) for _ in range(4)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=120)
    assert [rank.exitcode for rank in ranks] == [0] * 4
    files = [os.path.join(root, p) for entry in read_manifest(root)["shards"] for p, _ in shard_files(entry)]
    assert sorted(log.read_text().split()) == sorted(files)


def test_a_damaged_mark_costs_one_full_hash_not_the_run(identity_datasets, tmp_path, monkeypatch):
    root = copy_of(identity_datasets, "webdataset", tmp_path)
    with open(os.path.join(root, MARK_NAME), "w") as f:
        f.write('{"version": 1, "files": {"chunk-0')  # torn by a killed writer on a filesystem without rename
    hashed = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path: hashed.append(path) or real(path))
    read_an_epoch(root, "webdataset")
    files = {p for entry in read_manifest(root)["shards"] for p, _ in shard_files(entry)}
    assert len(hashed) == len(files) and set(read_mark(os.path.join(root, MARK_NAME))) == files


# --- a sample's stored hash (and a tar's index row) is read alone ------------------------------

def read_chars() -> int:
    """Bytes this process has asked the kernel for so far (Linux's rchar: page-cache hits included)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_shards_first_read_reads_its_sample_and_a_few_bytes_more_not_its_whole_hash_file(identity_datasets,
                                                                                          fmt):
    # As a rank at world 8 does: one sample of each shard. The hash file of a 64-sample shard is 640 bytes
    # (a tar's offset index 1,664): read whole, they would cost more than the sample's 512 bytes.
    from dtr_scale.data.readers import open_reader

    root = identity_datasets[fmt]
    manifest = read_manifest(root)
    reader = open_reader(root, manifest)
    starts = np.cumsum([0] + [entry["samples"] for entry in manifest["shards"]])[:-1]
    before = read_chars()
    for position in starts + 5:
        reader.read_batch(np.array([position]))
    read = read_chars() - before
    npy_header, proc_io = 128, 200  # the .npy header parsed once per shard; this test's own read of rchar
    sample = SAMPLE_BYTES + 64 if fmt == "mds" else SAMPLE_BYTES  # MDS: its offsets, index, label, source too
    row = 8 if fmt == "mds" else 8 + 24  # the sample's hash; a tar's index row besides
    assert read <= len(starts) * (sample + npy_header * (1 if fmt == "mds" else 2) + row) + proc_io, read


def write_npy_keeping_mtime(path, array):
    stat = os.stat(path)
    np.save(path, array)  # np.save appends .npy to a name without it; ours ends in .npy
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_hash_file_of_the_wrong_type_that_the_mark_trusts_is_named_at_the_read(identity_datasets, tmp_path):
    root = copy_of(identity_datasets, "mds", tmp_path)
    hashes = sample_hash_path(shard_path(root, 1))
    write_npy_keeping_mtime(hashes, np.load(hashes).view(np.float64))  # same size: invisible to the mark
    with pytest.raises(ShardDataError, match=rf"{hashes} holds float64 where prep writes uint64: it was damaged"):
        read_an_epoch(root, "mds")


def test_a_truncated_hash_file_is_named_before_the_first_batch(identity_datasets, tmp_path):
    root = copy_of(identity_datasets, "mds", tmp_path)
    hashes = sample_hash_path(shard_path(root, 1))
    truncate(hashes)
    with pytest.raises(ShardDataError, match=rf"shard {hashes} does not match the sha256"):
        loader(root, "mds")


@pytest.mark.parametrize("damage, problem", [
    ("truncated", r"is 4\d\d bytes where its header says 640"),
    ("wrong count", r"holds an array of shape \(63,\), prep wrote \(64,\)"),
    ("wrong dtype", "holds int32 where prep writes uint64"),
    ("fortran order", r"holds an array of shape \(8, 8\) in Fortran order, prep wrote \(64,\)"),
    ("not a .npy file", r"cannot be read as a .npy file \(the magic string is not correct"),
])
def test_a_damaged_hash_file_is_a_shard_error_naming_it(tmp_path, damage, problem):
    path = str(tmp_path / "shard.00000.mds.xxh3.npy")
    hashes = np.arange(64, dtype=np.uint64)
    if damage == "truncated":
        np.save(path, hashes)
        truncate(path)
    elif damage == "not a .npy file":
        with open(path, "wb") as f:
            f.write(hashes.tobytes())
    else:
        np.save(path, {"wrong count": hashes[:63], "wrong dtype": hashes.astype(np.int32),
                       "fortran order": np.asfortranarray(hashes.reshape(8, 8).T)}[damage])
    with pytest.raises(ShardDataError, match=rf"^{path} {problem}"):
        integrity.npy_rows(path, np.uint64, (64,))


def test_a_hash_file_cut_short_after_its_header_was_read_is_named_at_the_read(tmp_path):
    path = str(tmp_path / "shard.00000.mds.xxh3.npy")
    np.save(path, np.arange(64, dtype=np.uint64) * 3)
    rows = integrity.npy_rows(path, np.uint64, (64,))
    files = OpenFiles()
    assert [int(integrity.read_row(rows, i, files)) for i in (0, 1, 63)] == [0, 3, 189]
    truncate(path)
    with pytest.raises(ShardDataError, match=rf"{path} was cut short after it was verified: row 63 of 64 is missing"):
        integrity.read_row(rows, 63, files)


def test_a_start_reads_the_verified_mark_once_not_once_per_worker(identity_datasets, tmp_path, monkeypatch):
    # At 1,252 shards the mark is half a megabyte: 8 ranks x 8 workers each reading it cost a start 1 in 10
    # of the bytes its batches hold at 8 ranks.
    root = copy_of(identity_datasets, "mds", tmp_path)
    reads = tmp_path / "mark_reads.txt"
    real = integrity.read_mark

    def logged(path):
        with open(reads, "a") as f:  # a file: the forked workers' reads count too
            f.write(path + "\n")
        return real(path)

    monkeypatch.setattr(integrity, "read_mark", logged)
    read_an_epoch(root, "mds", workers=2)
    assert reads.read_text().split() == [os.path.join(root, MARK_NAME)]
