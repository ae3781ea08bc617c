"""README's main job, shortened: the digits prepared into shards, two processes trained through
the local launcher with checkpoints, a second command that resumes the run, the evaluator
scoring checkpoints, and the table, plot, sample grid, status and export that come out."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dtr_scale.config import to_train_config
from dtr_scale.eval.digits import load_digits_classifier
from dtr_scale.eval.results import read_results
from dtr_scale.launch.ledger import read_records
from dtr_scale.models import create_model
from dtr_scale.models.autoencoders import PixelAutoencoder
from dtr_scale.train.components import build_loader
from dtr_scale.train.metrics import read_metrics

DTR_SCALE = str(Path(sys.executable).parent / "dtr-scale")


def dtr_scale(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    run = subprocess.run([DTR_SCALE, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=600)
    assert run.returncode == 0, f"dtr-scale {' '.join(args)} failed:\n{run.stdout[-5000:]}"
    return run


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """`dtr-scale train` to step 20, then the same command to step 40 (a resume)."""
    root = tmp_path_factory.mktemp("main_job")
    run_dir = root / "run"
    shortened = [f"run_dir={run_dir}", "data.path=digits", "checkpoint.every=20", "eval.every=20",
                 "eval.num_samples=60", "eval.batch_size=30", "diffusion.sampling_steps=10", "logging.every=10",
                 "logging.wandb=disabled"]
    first = dtr_scale("train", "steps=20", *shortened, cwd=root)
    second = dtr_scale("train", "steps=40", *shortened, cwd=root)
    return root, run_dir, first, second


def test_the_digits_are_prepared_into_shards_once(main_job):
    root, _, first, second = main_job
    assert (root / "digits" / "manifest.json").exists()
    assert "preparing the embedded digits" in first.stdout
    assert "preparing the embedded digits" not in second.stdout


def test_the_digits_train_unmirrored_and_are_the_classifiers_digits(main_job):
    # A mirrored 2, 3, 4, 7 or 9 is not a digit: the default turns DiT's random flip off, so every
    # training latent decodes to a real digit that the digits classifier recognises.
    root, run_dir, _, _ = main_job
    cfg = to_train_config(OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml")))
    assert cfg.data.hflip is False
    cfg.data.path = str(root / "digits")
    latents, labels = next(build_loader(cfg, rank=0, world_size=1))
    images = PixelAutoencoder().decode(latents).numpy()
    accuracy = float((load_digits_classifier().extract(images)["logits"].argmax(1) == labels.numpy()).mean())
    assert len(images) == 64 and accuracy >= 0.97, accuracy


def test_two_processes_train_and_the_second_command_resumes(main_job):
    _, run_dir, _, _ = main_job
    jobs = read_records(run_dir)
    assert [(r["state"], r["start_step"], r.get("end_step")) for r in jobs] == [
        ("running", 0, None), ("finished", 0, 20), ("running", 20, None), ("finished", 20, 40)]
    assert [r["step"] for r in read_metrics(run_dir)] == [10, 20, 30, 40]  # no step trained twice
    assert all(math.isfinite(r["loss"]) for r in read_metrics(run_dir))


def test_every_checkpoint_is_scored_once_with_real_numbers(main_job):
    _, run_dir, _, _ = main_job
    results = read_results(run_dir)
    assert sorted(r["step"] for r in results) == [20, 40]
    for r in results:
        assert r["num_samples"] == 60 and r["reference"] == "digits" and r["averaging"] == "ema"
        assert math.isfinite(r["digits_fd"]) and r["digits_fd"] > 0
        assert 0.0 <= r["class_accuracy"] <= 1.0
    table = (run_dir / "eval" / "results.md").read_text()
    assert "| 20 | ema |" in table and "| 40 | ema |" in table
    assert (run_dir / "eval" / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_the_samples_are_an_adm_npz_and_a_grid(main_job):
    _, run_dir, _, _ = main_job
    (folder,) = (run_dir / "eval" / "samples").glob("step_00000040-ema-*")
    samples = np.load(folder / "samples.npz")
    assert samples["arr_0"].shape == (60, 16, 16, 3) and samples["arr_0"].dtype == np.uint8
    assert sorted(np.bincount(samples["arr_1"])) == [6] * 10  # class-balanced labels
    assert (folder / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_status_and_export_read_the_run(main_job, tmp_path):
    root, run_dir, _, second = main_job
    assert "state      finished" in second.stdout  # the summary at the end
    status = dtr_scale("status", str(run_dir), cwd=root).stdout
    assert "checkpoint_step" not in status and "(step 40)" in status and "| 40 | ema |" in status
    out = tmp_path / "ema.safetensors"
    dtr_scale("export", str(run_dir), str(out), cwd=root)
    model = create_model("DiT-S/2", input_size=8, in_channels=4, num_classes=10, depth=4, hidden_size=128,
                         num_heads=4)
    model.load_state_dict(load_file(str(out)), strict=True)


def test_the_default_shortened_learns_the_digits_well_above_chance(main_job):
    # The embedded default's model, method and data at a quarter of its steps (a shorter EMA to
    # match): half of its samples are already the digit they were drawn for.
    root, _, _, _ = main_job
    run_dir = root / "short"
    dtr_scale("train", f"run_dir={run_dir}", "data.path=digits", "cluster=none", "world_size=1", "steps=600",
              "ema_decay=0.98", "checkpoint.every=600", "eval.every=600", "eval.num_samples=100",
              "eval.batch_size=100", "diffusion.sampling_steps=25", "logging.wandb=disabled", cwd=root)
    (result,) = read_results(run_dir)
    # measured 0.51 here (100 samples: +-0.05); chance is 0.1
    assert result["step"] == 600 and result["class_accuracy"] >= 0.3, result
