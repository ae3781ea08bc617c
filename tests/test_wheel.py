"""The package as a GPU user installs it: a wheel built from the repository, installed without
-e into a fresh virtual environment (its dependencies taken from the test environment), run from
a directory outside the checkout. The configs come from inside the package."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def source_copy(dest: Path) -> Path:
    """The repository's files (tracked and new, not ignored), so the build writes nothing into the checkout."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the venv it is installed in)."""
    work = tmp_path_factory.mktemp("wheel")
    source = source_copy(work / "source")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", work / "dist",
        source, cwd=work)
    (wheel,) = (work / "dist").glob("dtr_scale-*.whl")
    venv = work / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=work)
    # The test environment's packages (torch, hydra, ...) after the new venv's own: a path line in
    # a .pth file adds the directory without running the .pth files in it, so the checkout's
    # editable install stays out and `dtr_scale` can only come from the wheel.
    site = Path(run(venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                    cwd=work).stdout.strip())
    (site / "test_env_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet", wheel, cwd=work)
    return wheel, venv


def test_the_wheel_ships_the_configs_and_the_license(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for packaged in ("dtr_scale/configs/train.yaml", "dtr_scale/configs/plan.yaml", "dtr_scale/configs/eval.yaml",
                     "dtr_scale/configs/cluster/none.yaml", "dtr_scale/configs/cluster/example_cluster.yaml",
                     "dtr_scale/configs/experiment/dtr_paper/dit_l2_dtr_antuw_2m.yaml",
                     "dtr_scale/plan/calibration.yaml"):
        assert packaged in names
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)


def test_the_installed_commands_work_outside_the_checkout(installed, tmp_path):
    _, venv = installed
    where = run(venv / "bin" / "python", "-c", "import dtr_scale; print(dtr_scale.__file__)", cwd=tmp_path).stdout
    assert str(venv) in where and str(ROOT) not in where  # the wheel's copy, not the checkout's
    from dtr_scale import __version__

    assert run(venv / "bin" / "dtr-scale", "--version", cwd=tmp_path).stdout.strip() == f"dtr-scale {__version__}"
    shown = run(venv / "bin" / "dtr-scale", "train", "--cfg", "job", cwd=tmp_path).stdout
    assert "name: DiT-S/2" in shown and "at_save: false" in shown and list(tmp_path.iterdir()) == []

    run_dir = tmp_path / "run"
    run(venv / "bin" / "dtr-scale", "train", "cluster=none", "world_size=1", "steps=5", "data=synthetic",
        "sample_at_end=0", "checkpoint.every=5", "logging.every=5", "logging.wandb=disabled", f"run_dir={run_dir}",
        cwd=tmp_path)
    assert (run_dir / "checkpoints" / "step_00000005").is_dir() and (run_dir / ".hydra" / "config.yaml").exists()
    (provenance,) = [json.loads(line) for line in (run_dir / "provenance.jsonl").read_text().splitlines()]
    assert provenance["dtr_scale"] == __version__ and provenance["git"] == {"commit": None, "dirty": None}
