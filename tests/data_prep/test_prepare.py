import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dtr_scale.models.autoencoders import PixelAutoencoder, load_autoencoder
from dtr_scale.data_prep.images import center_crop_arr
from dtr_scale.data_prep.layout import PrepError
from dtr_scale.data_prep.merge import merge, verify
from dtr_scale.data_prep.prepare import ChunkInProgress, PrepSettings, encode_with_flip, prepare
from dtr_scale.data_prep.sources import ArraySource, FolderSource
from dtr_scale.data.integrity import MARK_NAME
from dtr_scale.data.latents import draw_noise_and_flips
from dtr_scale.data.loader import build_shard_loader
from dtr_scale.data.readers import open_reader
from dtr_scale.data.shard_format import read_manifest


class CountingPixel(PixelAutoencoder):
    """Counts the images it encodes (flips excluded), to see which work a rerun repeats."""

    def __init__(self):
        self.images = 0

    def encode(self, images):
        self.images += len(images) // 2
        return super().encode(images)


def tree_bytes(root) -> dict[str, bytes]:
    """Every file under root except temporaries and the verified mark (it records file times), by relative path."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if ".tmp-" not in path and not name.startswith(MARK_NAME):
                files[os.path.relpath(path, root)] = open(path, "rb").read()
    return files


def stored(path):
    manifest = read_manifest(str(path))
    reader = open_reader(str(path), manifest)
    moments, labels = reader.read_batch(np.arange(len(reader)))
    return moments.copy(), labels, manifest


@pytest.mark.parametrize("fmt", ["mds", "webdataset"])
def test_round_trip_images_to_shards_to_loader(tmp_path, good_folder, fmt):
    root, images, labels = good_folder
    out = tmp_path / "out"
    prepare(FolderSource(str(root)), str(out), PixelAutoencoder(), PrepSettings(format=fmt, resolution=16,
                                                                               shard_size=8), progress=False)
    merge(str(out))

    moments, stored_labels, manifest = stored(out)
    expected = encode_with_flip(PixelAutoencoder(), images).astype(np.float16)
    np.testing.assert_array_equal(moments, expected)  # exact: what was encoded is what is read
    np.testing.assert_array_equal(stored_labels, labels)
    assert manifest["count_per_class"] == [7, 7, 7] and manifest["stored_shape"] == [2, 8, 8, 8]
    assert manifest["scale_factor"] == 1.0 and manifest["autoencoder"] == "pixel" and len(manifest["shards"]) == 3
    assert verify(str(out)) == []

    # The loader, one global batch holding every sample once: each latent is its image's or its flip's mean.
    loader = build_shard_loader(str(out), format=fmt, global_batch_size=21, rank=0, world_size=1, seed=3)
    latents, got_labels = next(loader)
    means = torch.from_numpy(expected[:, :, :4].astype(np.float32))  # [21, 2, 4, 8, 8]
    seen = []
    for latent, label in zip(latents, got_labels):
        match = [(i, f) for i in range(21) for f in range(2) if torch.equal(latent, means[i, f])]
        assert len(match) == 1
        seen.append(match[0])
        assert label == labels[match[0][0]]
    assert sorted(i for i, _ in seen) == list(range(21))
    assert 0 < sum(f for _, f in seen) < 21  # both the images and their flips are drawn


def test_shards_carry_index_and_source_and_open_in_the_native_libraries(tmp_path, good_folder):
    import webdataset as wds
    from streaming import LocalDataset

    root, _, _ = good_folder
    source = FolderSource(str(root))
    for fmt in ("mds", "webdataset"):
        prepare(source, str(tmp_path / fmt), PixelAutoencoder(), PrepSettings(format=fmt, resolution=16),
                progress=False)
        merge(str(tmp_path / fmt))
    mds = LocalDataset(str(tmp_path / "mds"))
    assert [int(mds[i]["index"]) for i in range(len(mds))] == list(range(21))
    assert mds[9]["source"] == source.keys[9] == "class_b/img_009.png"
    tars = [str(tmp_path / "webdataset" / s["path"]) for s in read_manifest(str(tmp_path / "webdataset"))["shards"]]
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(21)]
    assert samples[9]["source.txt"] == "class_b/img_009.png" and samples[9]["cls"] == 1
    np.testing.assert_array_equal(samples[9]["moments.npy"], mds[9]["moments"])


def test_bad_images_are_converted_or_skipped_and_reported(tmp_path, bad_folder):
    src, expected = bad_folder
    out = tmp_path / "out"
    prepare(FolderSource(str(src)), str(out), PixelAutoencoder(),
            PrepSettings(resolution=16, max_pixels=256 * 256), progress=False)
    manifest = merge(str(out))
    report = json.loads((out / "report.json").read_text())
    assert {s["source"]: s["reason"] for s in report["skipped"]} == expected["skipped"]
    assert {c["source"]: c["from_mode"] for c in report["converted"]} == expected["converted"]
    assert manifest["num_samples"] == 4 and manifest["num_skipped"] == 4
    assert report["skipped_by_reason"] == {"corrupt": 1, "empty": 1, "huge": 1, "truncated": 1}
    # The converted grayscale images keep their values: gray 100 and 16-bit 200 * 257 -> 200.
    moments, _, _ = stored(out)
    keys = FolderSource(str(src)).keys
    kept = [k for k in keys if k not in expected["skipped"]]
    assert kept == ["only/a_good.png", "only/cmyk.jpg", "only/gray.png", "only/sixteen.png"]
    np.testing.assert_allclose(moments[2, :, :4], np.float16(100 / 127.5 - 1))
    np.testing.assert_allclose(moments[3, :, :4], np.float16(200 / 127.5 - 1))


def test_interrupted_prep_resumes_to_byte_identical_shards(tmp_path, good_folder, monkeypatch):
    root, _, _ = good_folder
    source = FolderSource(str(root))
    settings = PrepSettings(format="mds", resolution=16, shard_size=5)  # 5 chunks, 3 batches of 2 each
    prepare(source, str(tmp_path / "clean"), PixelAutoencoder(), settings, batch_size=2, progress=False)
    merge(str(tmp_path / "clean"))

    calls = {"n": 0}
    original_add = ChunkInProgress.add

    def add_then_die(self, batch, autoencoder):
        calls["n"] += 1
        if calls["n"] == 8:  # chunks 0 and 1 are finished, chunk 2 is half written
            raise KeyboardInterrupt
        original_add(self, batch, autoencoder)

    monkeypatch.setattr(ChunkInProgress, "add", add_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, str(tmp_path / "resumed"), PixelAutoencoder(), settings, batch_size=2, progress=False)
    monkeypatch.setattr(ChunkInProgress, "add", original_add)
    names = sorted(os.listdir(tmp_path / "resumed"))
    assert "chunk-000001" in names and "chunk-000002" not in names
    assert any(n.startswith(".chunk-000002.tmp-") for n in names)
    with pytest.raises(PrepError, match="chunks 2-4 of 5 are not finished.*part\\(s\\) 0"):
        merge(str(tmp_path / "resumed"))

    counting = CountingPixel()
    prepare(source, str(tmp_path / "resumed"), counting, settings, batch_size=2, progress=False)
    merge(str(tmp_path / "resumed"))
    assert counting.images == 21 - 10  # only the unfinished chunks were encoded again
    clean, resumed = tree_bytes(tmp_path / "clean"), tree_bytes(tmp_path / "resumed")
    assert sorted(clean) == sorted(resumed)
    assert [k for k in clean if clean[k] != resumed[k]] == []


def test_parts_cover_the_listing_and_merge_names_a_missing_part(tmp_path, good_folder):
    root, _, _ = good_folder
    source = FolderSource(str(root))
    settings = PrepSettings(format="webdataset", resolution=16, shard_size=4)  # 6 chunks
    out = str(tmp_path / "parts")
    for part in (0, 2):
        prepare(source, out, PixelAutoencoder(), settings, part=part, num_parts=3, progress=False)
    with pytest.raises(PrepError, match=r"chunks 2-3 of 6.*part\(s\) 1.*--part 1 --num-parts 3"):
        merge(out)
    counting = CountingPixel()
    prepare(source, out, counting, settings, part=0, num_parts=3, progress=False)  # finished: skipped
    assert counting.images == 0
    prepare(source, out, counting, settings, part=1, num_parts=3, progress=False)
    assert counting.images == 8
    merge(out)
    prepare(source, str(tmp_path / "one"), PixelAutoencoder(), settings, progress=False)
    merge(str(tmp_path / "one"))
    split, single = tree_bytes(out), tree_bytes(tmp_path / "one")
    shards = [k for k in single if k.startswith("chunk-")]
    assert len(shards) == 6 * 4 and all(split[k] == single[k] for k in shards)  # tar, index, hashes, chunk.json
    assert split["manifest.json"] == single["manifest.json"]


def test_settings_must_match_an_existing_output(tmp_path, good_folder):
    root, _, _ = good_folder
    out = str(tmp_path / "out")
    prepare(FolderSource(str(root)), out, PixelAutoencoder(), PrepSettings(resolution=16), progress=False)
    with pytest.raises(PrepError, match="resolution"):
        prepare(FolderSource(str(root)), out, PixelAutoencoder(), PrepSettings(resolution=32), progress=False)


def test_unwritable_output_fails_before_any_work(tmp_path, good_folder):
    root, _, _ = good_folder
    (tmp_path / "a_file").write_text("not a directory")
    counting = CountingPixel()
    with pytest.raises(PrepError, match="not writable"):
        prepare(FolderSource(str(root)), str(tmp_path / "a_file" / "out"), counting, PrepSettings(resolution=16))
    assert counting.images == 0


def test_tiny_sd_vae_goes_through_the_real_path(tmp_path, tiny_vae_dir):
    autoencoder = load_autoencoder(tiny_vae_dir)
    images = np.random.default_rng(5).integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
    source = ArraySource("toy", images, np.arange(6) % 2, ["even", "odd"])
    out = str(tmp_path / "out")
    prepare(source, out, autoencoder, PrepSettings(resolution=16), batch_size=8, progress=False)
    manifest = merge(out)
    assert manifest["scale_factor"] == pytest.approx(0.18215) and manifest["autoencoder"] == os.path.abspath(tiny_vae_dir)

    moments, _, _ = stored(out)
    crops = np.stack([center_crop_arr(Image.fromarray(im), 16) for im in images])
    np.testing.assert_array_equal(moments, encode_with_flip(autoencoder, crops).astype(np.float16))
    assert (moments[:, :, 4:] > 0).all()  # a real posterior std is stored

    loader = build_shard_loader(out, format="mds", global_batch_size=6, rank=0, world_size=1, seed=11)
    for step in range(2):
        latents, _ = next(loader)
        positions = loader.order.rank_positions(step)
        eps, flips = draw_noise_and_flips(11, step, positions, (4, 8, 8))
        chosen = torch.from_numpy(moments[positions, flips.astype(int)].astype(np.float32))
        torch.testing.assert_close(latents, (chosen[:, :4] + chosen[:, 4:] * eps) * 0.18215)
