"""Running prep again over its own output: a finished output is left as it is (both formats), an
unfinished chunk is redone and nothing else; empty class folders and damaged JSON files are reported
by name."""

import json
import logging
import os
import shutil

import pytest

from dtr_scale.data.integrity import MARK_NAME
from dtr_scale.data_prep.cli import main
from dtr_scale.data.loader import build_shard_loader
from dtr_scale.io import CorruptFileError

COMMON = ["--autoencoder", "pixel", "--resolution", "16", "--shard-size", "8", "--workers", "0"]
FORMATS = ("mds", "webdataset")


def snapshot(out):
    """{relative path: (bytes, mtime_ns)} of every file of a prepared output but the verified mark (a record
    of file times, not of the data)."""
    files = {}
    for directory, _, names in os.walk(out):
        for name in (n for n in names if not n.startswith(MARK_NAME)):
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, out)] = (f.read(), os.stat(path).st_mtime_ns)
    return files


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_rerun_on_a_finished_output_changes_nothing_and_redoes_only_a_lost_chunk(tmp_path, good_folder, fmt):
    root, _, _ = good_folder
    out = str(tmp_path / "out")
    images = ["--no-progress", "images", str(root), out, "--format", fmt, *COMMON]
    main(images)
    first = snapshot(out)

    main(images)  # a rerun of the finished output (MDS used to stop with "index.json already exists")
    main(["merge", out])
    again = snapshot(out)
    assert {p: b for p, (b, _) in again.items()} == {p: b for p, (b, _) in first.items()}
    chunk_files = [p for p in first if p.startswith("chunk-")]
    assert all(again[p][1] == first[p][1] for p in chunk_files)  # no chunk was rewritten

    shutil.rmtree(os.path.join(out, "chunk-000001"))  # a chunk lost (deleted after a bad shard)
    main(images)
    redone = snapshot(out)
    assert {p: b for p, (b, _) in redone.items()} == {p: b for p, (b, _) in first.items()}
    assert [p for p in chunk_files if redone[p][1] != first[p][1]] == [p for p in chunk_files
                                                                       if p.startswith("chunk-000001/")]


def test_an_empty_class_folder_is_reported(tmp_path, good_folder, caplog):
    root, _, _ = good_folder
    (root / "class_0_empty").mkdir()
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        main(["--no-progress", "images", str(root), out, *COMMON])
    assert "class_0_empty" in caplog.text and "hold no images" in caplog.text
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert report["empty_class_folders"] == ["class_0_empty"]
    assert manifest["classes"] == ["class_a", "class_b", "class_c"] and manifest["count_per_class"] == [7, 7, 7]


@pytest.mark.parametrize("name", ["prep.json", "chunk-000001/chunk.json", "manifest.json"])
def test_a_damaged_json_file_is_an_error_naming_it(tmp_path, good_folder, name, capsys):
    root, _, _ = good_folder
    out = tmp_path / "out"
    main(["--no-progress", "images", str(root), str(out), *COMMON])
    (out / name).write_text('{"format": "mds", "classes": [')  # cut short
    command = ["verify", str(out)] if name == "manifest.json" else ["merge", str(out)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(command)
    [line] = capsys.readouterr().err.splitlines()  # damage found while working: status 1, one line
    assert exit_.value.code == 1 and f"{out / name} is not valid JSON" in line
    if name == "manifest.json":
        with pytest.raises(CorruptFileError, match=f"{out / name} is not valid JSON"):
            build_shard_loader(str(out), format="mds", global_batch_size=4, rank=0, world_size=1, seed=0)
