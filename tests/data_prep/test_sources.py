import io
import tarfile

import numpy as np
import pytest

from dtr_scale.data_prep.sources import FolderSource, SourceError, digits_source, listing_sha256


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in members.items():
            _add(tar, name, data)
    return buffer.getvalue()


def test_image_folder_labels_follow_sorted_class_names(good_folder):
    root, images, labels = good_folder
    source = FolderSource(str(root))
    assert source.classes == ["class_a", "class_b", "class_c"]
    np.testing.assert_array_equal(source.labels, labels)
    assert source.keys[0] == "class_a/img_000.png" and source.keys[-1] == "class_c/img_020.png"
    np.testing.assert_array_equal(np.asarray(source.open(8)), images[8])


def test_class_tars_and_one_tar_of_class_tars_list_the_same_images(tmp_path, good_folder):
    # ImageNet's train layout: one tar per class, and ILSVRC2012_img_train.tar holding those tars.
    root, images, _ = good_folder
    folder = FolderSource(str(root))
    class_tars = {}
    for cls in folder.classes:
        members = {p.name: p.read_bytes() for p in sorted((root / cls).iterdir())}
        class_tars[f"{cls}.tar"] = _tar_bytes(members)
    (tmp_path / "tars").mkdir()
    for name, data in class_tars.items():
        (tmp_path / "tars" / name).write_bytes(data)
    (tmp_path / "train.tar").write_bytes(_tar_bytes(class_tars))

    for src in (tmp_path / "tars", tmp_path / "train.tar"):
        source = FolderSource(str(src))
        assert source.classes == folder.classes
        np.testing.assert_array_equal(source.labels, folder.labels)
        assert source.keys[3] == "class_a.tar/img_003.png"
        np.testing.assert_array_equal(np.asarray(source.open(15)), images[15])


def test_a_class_list_fixes_labels_and_catches_a_missing_class_folder(good_folder, tmp_path):
    root, _, _ = good_folder
    source = FolderSource(str(root), classes=["class_c", "class_a", "class_b"])
    assert source.keys[0] == "class_c/img_014.png" and source.labels[0] == 0
    assert source.labels[source.keys.index("class_a/img_000.png")] == 1
    with pytest.raises(SourceError, match="missing.*class_d"):
        FolderSource(str(root), classes=["class_a", "class_b", "class_c", "class_d"])
    with pytest.raises(SourceError, match="not in the class list: class_c"):
        FolderSource(str(root), classes=["class_a", "class_b"])


def test_empty_and_classless_sources_are_refused(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        FolderSource(str(tmp_path / "nowhere"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"loose image, no class folder")
    with pytest.raises(SourceError, match="no class folders"):
        FolderSource(str(tmp_path / "flat"))
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(SourceError, match="no class folders"):
        FolderSource(str(tmp_path / "empty"))


def test_compressed_tars_are_refused_with_a_reason(tmp_path):
    import gzip

    (tmp_path / "train.tar").write_bytes(gzip.compress(_tar_bytes({"a/x.png": b"123"})))
    with pytest.raises(SourceError, match="uncompressed"):
        FolderSource(str(tmp_path / "train.tar"))


def test_listing_hash_changes_with_the_listing_only(good_folder):
    root, _, _ = good_folder
    first = listing_sha256(FolderSource(str(root)))
    assert listing_sha256(FolderSource(str(root))) == first
    (root / "class_b" / "img_999.png").write_bytes((root / "class_b" / "img_007.png").read_bytes())
    assert listing_sha256(FolderSource(str(root))) != first


def test_digits_source_is_the_sklearn_digits():
    source = digits_source(16)
    assert len(source) == 1797 and source.classes == [str(c) for c in range(10)]
    assert np.asarray(source.open(0)).shape == (16, 16, 3)
