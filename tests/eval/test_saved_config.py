"""A run directory is data: `dtr-scale eval --submit` never runs shell lines read from it,
while the cluster setup given on its own command line still runs."""

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from dtr_scale.config import ConfigError, to_train_config
from dtr_scale.eval.results import read_results
from dtr_scale.eval.saved_config import without_shell_lines
from dtr_scale.train.checkpoint import MANIFEST, META, checkpoint_dir

DTR_SCALE = str(Path(sys.executable).parent / "dtr-scale")


def plant_in_meta(run_dir: Path, step: int, cluster: dict) -> None:
    """Write `cluster` into checkpoint step's meta.json and make the manifest agree with the
    edited file, as someone with write access to the run directory could."""
    edit_meta(run_dir, step, lambda config: config.update(cluster=cluster))


def edit_meta(run_dir: Path, step: int, edit: Callable[[dict], None]) -> None:
    """Apply `edit` to the config in checkpoint step's meta.json; the manifest made to agree."""
    root = checkpoint_dir(run_dir)
    meta_path = root / f"step_{step:08d}" / META
    meta = json.loads(meta_path.read_text())
    edit(meta["config"])
    meta_path.write_text(json.dumps(meta))
    manifest = json.loads((root / MANIFEST).read_text())
    for entry in manifest["checkpoints"]:
        if entry["step"] == step:
            entry["files"][META] = meta_path.stat().st_size
            for name in ("hashes", "sha256"):  # content hashes, where the manifest keeps them
                if isinstance(entry.get(name), dict) and META in entry[name]:
                    entry[name][META] = hashlib.sha256(meta_path.read_bytes()).hexdigest()
    (root / MANIFEST).write_text(json.dumps(manifest))


def test_submit_runs_the_command_lines_setup_never_the_one_saved_in_the_run(run_copy, tmp_path):
    planted, own = tmp_path / "PLANTED", tmp_path / "OWN"
    plant_in_meta(run_copy, 250, {"kind": "local", "setup": [f"touch {planted}"],
                                  "sbatch_extra": {"comment": "x"}, "time_min": 10, "signal_delay_s": 30})
    (run_copy / ".hydra").mkdir(exist_ok=True)
    (run_copy / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"cluster": {"setup": [f"touch {planted}"]}}))
    result = subprocess.run(
        [DTR_SCALE, "eval", f"run_dir={run_copy}", "--submit", "--checkpoint", "100", "eval.num_samples=10",
         "eval.batch_size=10", "diffusion.sampling_steps=2", f"cluster.setup=['touch {own}']"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "not using its cluster.setup/sbatch_extra" in result.stdout + result.stderr
    deadline = time.monotonic() + 120
    while not read_results(run_copy) and time.monotonic() < deadline:  # the local job evaluates step 100
        time.sleep(0.5)
    assert [r["step"] for r in read_results(run_copy)] == [100]
    assert own.exists()  # the user's own setup line ran in the job
    assert not planted.exists()


def test_a_saved_cluster_string_with_a_line_break_is_refused_naming_the_file(tmp_path):
    source = tmp_path / "meta.json"
    saved = {"steps": 5, "cluster": {"kind": "slurm", "partition": "gpu\ntouch /tmp/x", "setup": ["rm -rf ~"]}}
    with pytest.raises(ConfigError, match=r"cluster.partition in .*meta.json holds a line break"):
        without_shell_lines(saved, source)
    kept = without_shell_lines({"steps": 5, "cluster": {"kind": "slurm", "partition": "gpu", "setup": ["x"]}}, source)
    assert kept == {"steps": 5, "cluster": {"kind": "slurm", "partition": "gpu"}}


def test_a_run_whose_checkpoints_hold_a_retired_key_is_still_evaluated(run_copy):
    """data.read_threads, written into meta.json by the version before the loader's read hints."""
    manifest = json.loads((checkpoint_dir(run_copy) / MANIFEST).read_text())
    for entry in manifest["checkpoints"]:
        edit_meta(run_copy, entry["step"], lambda config: config["data"].update(read_threads=8))
    with pytest.raises(ConfigError, match="read_threads"):  # not a key of this schema ...
        to_train_config(json.loads((checkpoint_dir(run_copy) / "step_00000100" / META).read_text())["config"])
    result = subprocess.run(  # ... and yet the run's checkpoints are read
        [DTR_SCALE, "eval", f"run_dir={run_copy}", "--checkpoint", "100", "eval.num_samples=10", "eval.batch_size=10",
         "diffusion.sampling_steps=2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in read_results(run_copy)] == [100]
