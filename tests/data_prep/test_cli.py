import json
import os
import re

import pytest

from dtr_scale.data_prep.cli import main, resolve_part, slurm_part
from dtr_scale.data_prep.layout import PrepError
from dtr_scale.data.shard_format import read_manifest


def test_the_slurm_array_task_picks_the_part():
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "8"}
    assert slurm_part(env) == (3, 8)
    assert slurm_part({}) is None
    assert resolve_part(None, None, env) == (3, 8)
    assert resolve_part(1, 2, env) == (1, 2)  # explicit flags win
    assert resolve_part(None, None, {}) == (0, 1)
    with pytest.raises(PrepError, match="both --part and --num-parts"):
        resolve_part(1, None, {})


def test_digits_command_prepares_the_embedded_dataset(tmp_path):
    out = str(tmp_path / "digits")
    main(["--no-progress", "digits", out, "--format", "webdataset"])
    manifest = read_manifest(out)
    assert manifest["num_samples"] == 1797 and manifest["latent_shape"] == [4, 8, 8]
    assert manifest["count_per_class"][0] == 178 and manifest["format"] == "webdataset"
    main(["verify", out])


def test_images_command_on_one_machine_merges_and_workers_do_not_change_the_bytes(tmp_path, good_folder):
    root, _, _ = good_folder
    common = ["--autoencoder", "pixel", "--resolution", "16", "--shard-size", "8"]
    main(["--no-progress", "images", str(root), str(tmp_path / "w0"), "--workers", "0", *common])
    main(["--no-progress", "images", str(root), str(tmp_path / "w2"), "--workers", "2", *common])
    for name in ("manifest.json", "index.json", "chunk-000001/shard.00000.mds"):
        assert (tmp_path / "w0" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    assert json.loads((tmp_path / "w0" / "manifest.json").read_text())["num_samples"] == 21


def test_array_job_parts_then_merge(tmp_path, good_folder, monkeypatch):
    root, _, _ = good_folder
    out = str(tmp_path / "out")
    for task in ("0", "1"):
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", task)
        monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
        main(["--no-progress", "images", str(root), out, "--autoencoder", "pixel", "--resolution", "16",
              "--shard-size", "4", "--workers", "0"])
    assert not os.path.exists(os.path.join(out, "manifest.json"))  # array parts never merge by themselves
    assert sorted(os.listdir(os.path.join(out, "parts"))) == ["part-00000-of-00002.json", "part-00001-of-00002.json"]
    main(["merge", out])
    assert read_manifest(out)["num_samples"] == 21


def usage_error(capsys, argv: list[str]) -> str:
    """The one line main(argv) prints for a usage error, after checking it exits with status 2."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("dtr-scale prep: config error: "), err
    return err


def test_errors_exit_with_a_message_before_any_work(tmp_path, good_folder, capsys):
    root, _, _ = good_folder
    (tmp_path / "file").write_text("")
    # checked before the (missing) source is listed
    assert "not writable" in usage_error(capsys, ["images", str(tmp_path / "missing"), str(tmp_path / "file" / "out"),
                                                  "--autoencoder", "pixel"])
    assert "does not exist" in usage_error(capsys, ["images", str(tmp_path / "missing"), str(tmp_path / "out"),
                                                    "--autoencoder", "pixel"])
    (tmp_path / "classes.txt").write_text("class_a\nclass_b\nclass_c\nclass_z\n")
    assert re.search("missing.*class_z", usage_error(capsys, ["images", str(root), str(tmp_path / "out"), "--autoencoder",
                                                              "pixel", "--classes", str(tmp_path / "classes.txt")]))
    (tmp_path / "empty").mkdir()
    assert "no class folders" in usage_error(capsys, ["images", str(tmp_path / "empty"), str(tmp_path / "out"),
                                                      "--autoencoder", "pixel"])
    assert "sd-vae-ft-ema not found" in usage_error(capsys, ["images", str(root), str(tmp_path / "out"),
                                                             "--vae-weights", str(tmp_path / "no_vae")])
    assert not any(n.startswith("chunk-") for n in os.listdir(tmp_path / "out"))
