"""resume_from=STEP|PATH: start a run from a chosen complete checkpoint instead of its latest
(DiT's --ckpt, torchtitan's checkpoint.load_step).

The launching command applies it once, before training starts or a job is submitted
(`start_from`), by making the chosen checkpoint the latest of the run:

- a checkpoint of this run (STEP, or a path in RUN_DIR/checkpoints): what the run wrote after
  that step (the later checkpoints, the post-hoc EMA snapshots, the metrics lines, the
  evaluation results, claims and samples) is moved to RUN_DIR/superseded/after_step_STEP/,
  laid out like a run directory, so nothing is deleted and each superseded checkpoint can still
  be exported, evaluated or resumed from (resume_from=RUN_DIR/superseded/.../step_N);
- a checkpoint of another run: what this run holds at or after its step is moved aside the same
  way, then the checkpoint is linked (copied across filesystems) into RUN_DIR/checkpoints with
  its manifest entry, beside the other run's post-hoc EMA snapshots and metrics lines up to it.

The trainer then resumes from the latest checkpoint as always, so a requeued job goes on from
its own newer checkpoints; giving resume_from again goes back to the chosen checkpoint again.

Plain files, no torch: the launch check (`check_resume_from`) answers before torch is imported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from dtr_scale.config import ConfigError, TrainConfig
from dtr_scale.io import atomic_write_json, fsync_dir, read_jsonl, rewrite_jsonl
from dtr_scale.train.manifest import (
    MANIFEST, CheckpointError, checkpoint_dir, checkpoint_name, read_manifest, require_complete, verify_checkpoint,
)

log = logging.getLogger(__name__)

SUPERSEDED = "superseded"
METRICS = "metrics.jsonl"  # train.training_plot.metrics_path's name (that module imports matplotlib)
EVAL_LOGS = ("eval/results.jsonl", "eval/work.jsonl")  # eval.results / eval.work_log: one record per line
SNAPSHOTS = "phema"  # train.phema.snapshot_dir: phema-{step:08d}-{std}.safetensors


def chosen_checkpoint(cfg: TrainConfig) -> Path | None:
    """The checkpoint directory resume_from names (None without it): STEP is
    RUN_DIR/checkpoints/step_STEP, anything else a path."""
    spec = cfg.resume_from
    if spec is None:
        return None
    spec = spec.strip()
    if spec.isdigit():
        return checkpoint_dir(Path(cfg.run_dir).resolve()) / checkpoint_name(int(spec))
    return Path(spec).expanduser().resolve()


def manifest_entry(path: Path) -> dict[str, Any] | None:
    """Checkpoint `path`'s entry in its run's manifest, or None if it is not listed."""
    return next((e for e in read_manifest(path.parent.parent) if e["name"] == path.name), None)


def check_resume_from(cfg: TrainConfig) -> Path | None:
    """resume_from's checkpoint, after checking that it is listed in its run's manifest with every
    file at its recorded size (ConfigError naming it otherwise); None without resume_from."""
    path = chosen_checkpoint(cfg)
    if path is None:
        return None
    key = f"resume_from={cfg.resume_from}"
    try:
        entries = read_manifest(path.parent.parent)
        entry = manifest_entry(path)
    except CheckpointError as err:
        raise ConfigError(f"{key}: {err}") from None
    if entry is None:
        steps = ", ".join(str(e["step"]) for e in entries) or "none"
        why = ("does not exist" if not path.exists() else
               f"is not listed in {path.parent / MANIFEST}: it was never completed (a crash while writing?) "
               f"or is not a dtr-scale checkpoint")
        raise ConfigError(f"{key}: {path} {why}; the complete checkpoints of {path.parent.parent} are at "
                          f"steps: {steps}. Give one of those (or the directory of one)")
    problem = verify_checkpoint(path, entry)
    if problem is not None:
        raise ConfigError(f"{key}: checkpoint {path} is incomplete ({problem}); choose another checkpoint")
    return path


def in_run(path: Path, run_dir: str | Path) -> bool:
    """Whether checkpoint `path` is one of run_dir's own (not another run's, nor a superseded one)."""
    return path.parent == checkpoint_dir(Path(run_dir).resolve())


def start_from(cfg: TrainConfig) -> Path | None:
    """Make resume_from's checkpoint the latest of cfg.run_dir (the module docstring says how);
    the folder that what was moved aside went to, or None. ConfigError if the checkpoint is
    damaged or a trainer holds the run directory; nothing is moved then."""
    path = check_resume_from(cfg)
    if path is None:
        return None
    try:
        require_complete(path)  # the hashes: a damaged one would make the resume fall back silently
    except CheckpointError as err:
        raise ConfigError(f"resume_from={cfg.resume_from}: {err}") from None
    run_dir = Path(cfg.run_dir).resolve()
    entry = manifest_entry(path)
    step = int(entry["step"])
    with run_dir_held(run_dir):
        if in_run(path, run_dir):
            moved = supersede(run_dir, after=step)
        else:
            moved = supersede(run_dir, after=step - 1)  # its own step too: the adopted one takes its name
            adopt(path, entry, run_dir)
    log.info("resume_from=%s: training resumes from %s%s", cfg.resume_from, path,
             f"; what the run wrote after step {step} is kept in {moved}" if moved else "")
    return moved


class run_dir_held:
    """The run directory's trainer lock for moving its files: a live trainer there is refused."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.lock = run_dir, None

    def __enter__(self) -> None:
        from dtr_scale.train.lock import NO_LOCK_ENV, RunDirLock, RunDirLockedError  # torch: only once a run starts

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if os.environ.get(NO_LOCK_ENV) == "1":
            return
        self.lock = RunDirLock(self.run_dir)
        try:
            self.lock.acquire()
        except RunDirLockedError as err:
            raise ConfigError(f"resume_from: {err}") from None

    def __exit__(self, *exc: object) -> None:
        if self.lock is not None:
            self.lock.release()


def superseded_dir(run_dir: Path, step: int) -> Path:
    """A new RUN_DIR/superseded/after_step_N folder (-2, -3, ... when going back to N again)."""
    base = run_dir / SUPERSEDED / f"after_{checkpoint_name(step)}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def record_step(record: dict[str, Any]) -> int:
    """The step of a metrics line or an evaluation result (its `step`) or claim (its key's first value)."""
    return int(record["step"]) if "step" in record else int(json.loads(record["key"])[0])


def name_step(name: str) -> int:
    """The step in a snapshot's or a sample folder's name: phema-00000200-0.050..., step_00000200-ema-..."""
    return int(name.replace("_", "-").split("-")[1])


def supersede(run_dir: Path, after: int) -> Path | None:
    """Move what run_dir holds of the steps after `after` into a new superseded folder; the folder,
    or None when there was nothing to move."""
    entries = read_manifest(run_dir)
    later = [e for e in entries if e["step"] > after]
    files = [p for p in sorted((run_dir / SNAPSHOTS).glob("phema-*")) if name_step(p.name) > after]
    files += [p for p in sorted((run_dir / "eval" / "samples").glob("step_*")) if name_step(p.name) > after]
    logs = [(name, [r for r in read_jsonl(run_dir / name) if record_step(r) > after])
            for name in (METRICS, *EVAL_LOGS) if (run_dir / name).exists()]
    logs = [(name, moved) for name, moved in logs if moved]
    if not (later or files or logs):
        return None
    dest = superseded_dir(run_dir, after)
    if later:
        # their manifest there first, then the directories, then this run's manifest without them:
        # a crash in between leaves an entry whose directory is gone (passed over), never a lost checkpoint
        (dest / "checkpoints").mkdir(parents=True)
        atomic_write_json(dest / "checkpoints" / MANIFEST, {"checkpoints": later})
        for e in later:
            if (checkpoint_dir(run_dir) / e["name"]).exists():
                (checkpoint_dir(run_dir) / e["name"]).replace(dest / "checkpoints" / e["name"])
        fsync_dir(dest / "checkpoints")
        atomic_write_json(checkpoint_dir(run_dir) / MANIFEST, {"checkpoints": [e for e in entries if e["step"] <= after]})
    for path in files:
        target = dest / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
    for name, moved in logs:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        rewrite_jsonl(dest / name, moved)  # written there before they leave the run's file
        rewrite_jsonl(run_dir / name, [r for r in read_jsonl(run_dir / name) if record_step(r) <= after])
    return dest


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (checkpoint files are never rewritten in place), or a copy across filesystems."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def adopt(path: Path, entry: dict[str, Any], run_dir: Path) -> None:
    """Bring checkpoint `path` of another run into run_dir as its latest, with the commit protocol
    of train.checkpoint (files under .partial, the manifest, the rename), plus that run's post-hoc
    EMA snapshots up to its step (the evaluator reconstructs from them) and, for a run dir without
    metrics yet, its metrics lines up to that step."""
    root = checkpoint_dir(run_dir)
    partial = root / f"{entry['name']}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    for name in entry["files"]:
        link_or_copy(path / name, partial / name)
    entries = [e for e in read_manifest(run_dir) if e["step"] < entry["step"]]
    atomic_write_json(root / MANIFEST, {"checkpoints": [*entries, {**entry, "time": time.time()}]})
    partial.replace(root / entry["name"])
    fsync_dir(root)
    source = path.parent.parent
    for snapshot in sorted((source / SNAPSHOTS).glob("phema-*")):
        if name_step(snapshot.name) <= entry["step"] and not (run_dir / SNAPSHOTS / snapshot.name).exists():
            link_or_copy(snapshot, run_dir / SNAPSHOTS / snapshot.name)
    if (source / METRICS).exists() and not (run_dir / METRICS).exists():
        from dtr_scale.train.metrics import records_up_to  # matplotlib: only once a run starts

        rewrite_jsonl(run_dir / METRICS, records_up_to(read_jsonl(source / METRICS), entry["step"]))
