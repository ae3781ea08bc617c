"""resume_from=STEP|PATH through the command a user types: the run goes on from the chosen checkpoint
with the same trajectory, keeps what it wrote after it (moved to RUN/superseded/after_step_N), and a
missing, incomplete or foreign checkpoint is refused (exit 2, named) before anything is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dtr_scale.io import append_jsonl, read_json, read_jsonl
from dtr_scale.train.checkpoint import open_checkpoint
from dtr_scale.train.lock import RunDirLock
from dtr_scale.train.manifest import checkpoint_name
from dtr_scale.train.resume_from import supersede

DTR_SCALE = str(Path(sys.executable).parent / "dtr-scale")
# 6 steps, a checkpoint (and post-hoc EMA snapshots) every 2, a metrics line every step, TensorBoard on
RUN = ["cluster=none", "world_size=1", "data=synthetic", "model=tiny", "model.depth=1", "model.hidden_size=32",
       "model.num_heads=2", "global_batch_size=16", "steps=6", "checkpoint.every=2", "checkpoint.async_save=false",
       "logging.every=1", "logging.wandb=disabled", "logging.tensorboard=true", "sample_at_end=0"]


def train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([DTR_SCALE, "train", *RUN, f"run_dir={run_dir}", *overrides], capture_output=True,
                          text=True, timeout=300, cwd=run_dir.parent)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")}


def tree(run_dir: Path) -> dict[str, bytes]:
    """Every file under run_dir with its bytes, but the log and lock a refused command may touch."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name not in ("train.log", "trainer.lock") and ".hydra" not in p.parts}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("resume_from") / "first"
    run_dir.parent.mkdir(exist_ok=True)
    done = train(run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


@pytest.fixture
def copy_of(first_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(first_run, run_dir)
    return run_dir


def test_resume_from_a_step_retrains_the_same_steps_and_keeps_the_later_checkpoints(first_run, copy_of):
    run_dir, before = copy_of, losses(first_run)
    old_manifest = read_json(first_run / "checkpoints" / "manifest.json")["checkpoints"]

    done = train(run_dir, "resume_from=2")
    assert done.returncode == 0, done.stderr[-3000:]
    # the trajectory is deterministic: steps 3..6 again, bit for bit; steps 1, 2 kept as they were
    assert losses(run_dir) == before and sorted(before) == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]

    # the first run's checkpoints 4 and 6 are kept, with their manifest entries, files and metrics lines
    aside = run_dir / "superseded" / "after_step_00000002"
    assert read_json(aside / "checkpoints" / "manifest.json")["checkpoints"] == old_manifest[1:]
    for step in (4, 6):
        name = checkpoint_name(step)
        assert tree(aside / "checkpoints" / name) == tree(first_run / "checkpoints" / name)
        assert open_checkpoint(aside / "checkpoints" / name).step == step  # complete where it is: hashes checked
        assert tree(aside / "phema").keys() >= {f"phema-{step:08d}-0.050.safetensors"}
    assert read_jsonl(aside / "metrics.jsonl") == read_jsonl(first_run / "metrics.jsonl")[2:]
    # the run's own manifest goes 2 (kept), then the new 4 and 6
    entries = read_json(run_dir / "checkpoints" / "manifest.json")["checkpoints"]
    assert [e["step"] for e in entries] == [2, 4, 6] and entries[0] == old_manifest[0]

    # TensorBoard shows what metrics.jsonl holds: the killed trajectory's events past step 2 are purged
    assert tensorboard_scalars(run_dir / "tensorboard", "loss") == [(s, float(np.float32(v))) for s, v in before.items()]


def tensorboard_scalars(directory: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of each `tag` event TensorBoard shows, in order (float32, as TensorBoard stores them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_resume_from_another_runs_checkpoint_goes_on_from_it(first_run, tmp_path):
    run_dir = tmp_path / "second"
    done = train(run_dir, f"resume_from={first_run / 'checkpoints' / checkpoint_name(4)}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(run_dir) == losses(first_run)  # 1..4 brought along, 5 and 6 trained again, bit for bit
    assert [e["step"] for e in read_json(run_dir / "checkpoints" / "manifest.json")["checkpoints"]] == [4, 6]
    assert sorted(p.name for p in (run_dir / "phema").iterdir()) == sorted(p.name for p in (first_run / "phema").iterdir())
    assert (first_run / "checkpoints" / checkpoint_name(4)).is_dir()  # the other run keeps its own


@pytest.mark.parametrize("resume_from, expected", [
    ("3", "resume_from=3: {run}/checkpoints/step_00000003 does not exist; the complete checkpoints of {run} are at "
          "steps: 2, 4, 6"),
    ("{run}/checkpoints/step_00000004.partial", "is not listed in"),
])
def test_a_missing_checkpoint_is_refused_before_anything_is_written(copy_of, resume_from, expected):
    run_dir = copy_of
    shutil.copytree(run_dir / "checkpoints" / checkpoint_name(4), run_dir / "checkpoints" / "step_00000004.partial")
    before = tree(run_dir)
    done = train(run_dir, f"resume_from={resume_from.format(run=run_dir)}")
    assert done.returncode == 2, done.stderr[-3000:]
    assert expected.format(run=run_dir) in done.stderr and "config error" in done.stderr
    assert tree(run_dir) == before and not (run_dir / "superseded").exists()


def test_a_run_dir_in_use_by_a_trainer_is_left_alone(copy_of):
    lock = RunDirLock(copy_of)
    lock.acquire()  # as a live trainer of this run holds it
    try:
        before = tree(copy_of)
        done = train(copy_of, "resume_from=2")
    finally:
        lock.release()
    assert done.returncode == 2 and "resume_from: " in done.stderr and "in use by another trainer" in done.stderr
    assert tree(copy_of) == before and not (copy_of / "superseded").exists()


def test_an_incomplete_checkpoint_is_refused_naming_its_file(copy_of):
    meta = copy_of / "checkpoints" / checkpoint_name(4) / "meta.json"
    meta.write_bytes(meta.read_bytes()[:-5])
    done = train(copy_of, "resume_from=4")
    assert done.returncode == 2
    assert f"resume_from=4: checkpoint {meta.parent} is incomplete ({meta} has" in done.stderr
    assert not (copy_of / "superseded").exists() and (copy_of / "checkpoints" / checkpoint_name(6)).is_dir()


def test_a_checkpoint_of_another_width_is_refused_naming_the_key(first_run, tmp_path):
    run_dir = tmp_path / "wider"
    done = train(run_dir, f"resume_from={first_run / 'checkpoints' / checkpoint_name(2)}", "model.hidden_size=64")
    assert done.returncode == 2
    assert "was trained with other settings" in done.stderr and "model.hidden_size: 32 -> 64" in done.stderr
    assert not (run_dir / "checkpoints").exists()


def add_step(run_dir: Path, step: int) -> None:
    """A step's files as the trainer and the evaluator lay them out, without weights."""
    meta = run_dir / "checkpoints" / checkpoint_name(step) / "meta.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"step": step}))
    manifest = run_dir / "checkpoints" / "manifest.json"
    entries = read_json(manifest)["checkpoints"] if manifest.exists() else []
    entry = {"step": step, "name": meta.parent.name, "files": {"meta.json": meta.stat().st_size}}
    manifest.write_text(json.dumps({"checkpoints": [*entries, entry]}))
    (run_dir / "phema").mkdir(exist_ok=True)
    (run_dir / "phema" / f"phema-{step:08d}-0.050.safetensors").write_bytes(b"x")
    (run_dir / "eval" / "samples" / f"{checkpoint_name(step)}-ema-ddpm50-cfg1.5-abcd1234").mkdir(parents=True)
    append_jsonl(run_dir / "metrics.jsonl", {"step": step, "loss": step / 10})
    append_jsonl(run_dir / "eval" / "results.jsonl", {"step": step, "averaging": "ema", "fid": 10 - step})
    append_jsonl(run_dir / "eval" / "work.jsonl", {"key": json.dumps([step, "ema"]), "event": "failed"})


def test_supersede_moves_every_file_of_the_later_steps_and_a_second_time_to_a_new_folder(tmp_path):
    run_dir = tmp_path / "run"
    for step in (2, 4, 6):
        add_step(run_dir, step)
    first = supersede(run_dir, after=2)
    assert first == run_dir / "superseded" / "after_step_00000002"
    for where, steps in ((run_dir, [2]), (first, [4, 6])):
        assert [e["step"] for e in read_json(where / "checkpoints" / "manifest.json")["checkpoints"]] == steps
        assert sorted(p.name for p in (where / "checkpoints").glob("step_*")) == [checkpoint_name(s) for s in steps]
        assert sorted(p.name for p in (where / "phema").iterdir()) == [f"phema-{s:08d}-0.050.safetensors" for s in steps]
        assert [p.name[:13] for p in sorted((where / "eval" / "samples").iterdir())] == [checkpoint_name(s) for s in steps]
        assert [r["step"] for r in read_jsonl(where / "metrics.jsonl")] == steps
        assert [r["step"] for r in read_jsonl(where / "eval" / "results.jsonl")] == steps
        assert [json.loads(r["key"])[0] for r in read_jsonl(where / "eval" / "work.jsonl")] == steps

    add_step(run_dir, 4)  # the resumed run wrote a new step 4; going back to step 2 once more
    second = supersede(run_dir, after=2)
    assert second == run_dir / "superseded" / "after_step_00000002-2"
    assert (second / "checkpoints" / checkpoint_name(4)).is_dir() and (first / "checkpoints" / checkpoint_name(4)).is_dir()
    assert supersede(run_dir, after=2) is None  # nothing later left: nothing moved, no folder made
