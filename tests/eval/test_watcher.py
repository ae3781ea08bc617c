"""The watcher: exactly the complete, due checkpoints, once each, across its own restarts and
crashes; checkpoints being written are never read."""

import json
import shutil
import subprocess

import pytest
import submitit

from dtr_scale.config import ClusterConfig
from dtr_scale.eval import evaluate
from dtr_scale.eval.results import read_results
from dtr_scale.eval.jobs import EvaluationTask
from dtr_scale.eval.settings import EvalSettings
from dtr_scale.eval.watcher import trigger, watch
from dtr_scale.eval.work_log import MAX_ATTEMPTS, key_string, pending, record_event, work_items, work_path
from dtr_scale.launch.ledger import append_record
from dtr_scale.train.checkpoint import MANIFEST, checkpoint_dir

SMALL = {"eval.num_samples": 20, "eval.batch_size": 10, "diffusion.sampling_steps": 5}


@pytest.fixture
def loads(monkeypatch):
    """The checkpoints (name, averaging) whose weights the evaluator loads, in order."""
    seen = []
    real = evaluate.averaged_model

    def spy(checkpoint, spec, **options):
        seen.append((checkpoint.name, spec))
        return real(checkpoint, spec, **options)

    monkeypatch.setattr(evaluate, "averaged_model", spy)
    return seen


def add_checkpoint_being_written(run_dir, source_step=250):
    """step_00000400.partial (not committed yet) and a manifest entry for step 300 whose
    largest file is shorter than the manifest says (a torn copy)."""
    root = checkpoint_dir(run_dir)
    source = root / f"step_{source_step:08d}"
    shutil.copytree(source, root / "step_00000400.partial")
    shutil.copytree(source, root / "step_00000300")
    manifest = json.loads((root / MANIFEST).read_text())
    entry = next(e for e in manifest["checkpoints"] if e["step"] == source_step)
    manifest["checkpoints"].append({**entry, "step": 300, "name": "step_00000300"})
    (root / MANIFEST).write_text(json.dumps(manifest))
    shard = max((root / "step_00000300").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:64])


def test_evaluates_each_complete_due_checkpoint_once_across_a_restart(run_copy, eval_config, loads):
    add_checkpoint_being_written(run_copy)
    cfg = eval_config(run_copy, **SMALL)  # eval.every = 200, steps = 250: due are 200 and the last, 250

    first = watch(run_copy, cfg, poll_s=0.05, stop=lambda: len(loads) >= 1)  # stopped after one evaluation
    assert [r["step"] for r in first] == [200]
    second = watch(run_copy, cfg, poll_s=0.05)  # a restart; returns by itself: training has finished
    assert [r["step"] for r in second] == [250]
    assert watch(run_copy, cfg, poll_s=0.05) == []

    assert loads == [("step_00000200", "ema"), ("step_00000250", "ema")]  # never 100, 300 (torn) or 400 (partial)
    assert sorted(r["step"] for r in read_results(run_copy)) == [200, 250]


def test_while_training_runs_only_multiples_of_every_then_the_last_one(run_copy, eval_config, loads):
    cfg = eval_config(run_copy, **SMALL, steps=1000)  # training goes on past 250
    records = watch(run_copy, cfg, poll_s=0.05, max_wait_s=0.5)
    assert [r["step"] for r in records] == [200]  # 250 is the latest, but more are coming

    append_record(run_copy, "finished", end_step=250)  # the job ledger: the run ended early
    assert [r["step"] for r in watch(run_copy, cfg, poll_s=0.05)] == [250]
    assert [name for name, _ in loads] == ["step_00000200", "step_00000250"]


def dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_work_of_a_dead_claimant_is_taken_over_and_a_live_ones_is_left(run_copy, eval_config, loads):
    cfg = eval_config(run_copy, **SMALL)
    key_200, key_250 = (key_string(EvalSettings.of(cfg).result_key(step, "ema")) for step in (200, 250))
    record_event(run_copy, key_200, "claimed", token="crashed", pid=dead_pid())  # an evaluator that crashed
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        record_event(run_copy, key_250, "claimed", token="busy", pid=sleeper.pid)  # another watcher, still working
        assert [r["step"] for r in watch(run_copy, cfg, poll_s=0.05, max_wait_s=0.3)] == [200]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert [r["step"] for r in watch(run_copy, cfg, poll_s=0.05)] == [250]  # its claimant died: not forgotten
    assert [name for name, _ in loads] == ["step_00000200", "step_00000250"]


def test_a_failing_item_is_recorded_once_and_does_not_stop_the_others(run_copy, eval_config, loads):
    cfg = eval_config(run_copy, **SMALL, **{"eval.averaging": ["window:4", "ema"]})  # only 3 checkpoints exist
    records = watch(run_copy, cfg, poll_s=0.05)
    assert [(r["step"], r["averaging"]) for r in records] == [(200, "ema"), (250, "ema")]
    events = [json.loads(line) for line in work_path(run_copy).read_text().splitlines()]
    failed = [e for e in events if e["event"] == "failed"]
    assert len(failed) == 2 and all("needs 4 complete checkpoints" in e["error"] for e in failed)

    assert watch(run_copy, cfg, poll_s=0.05) == []  # not retried by a restart
    items = work_items([(200, run_copy / "checkpoints" / "step_00000200", "full")], cfg)
    assert [i.averaging for i in pending(run_copy, items, retry_failed=True)] == ["window:4"]
    assert len(loads) == 4


def test_an_item_whose_claimants_keep_dying_is_given_up(run_copy, eval_config):
    cfg = eval_config(run_copy, **SMALL)
    items = work_items([(200, run_copy / "checkpoints" / "step_00000200", "full")], cfg)
    for _ in range(MAX_ATTEMPTS):
        assert pending(run_copy, items) == items
        record_event(run_copy, items[0].key, "claimed", token="t", pid=dead_pid())
    assert pending(run_copy, items) == []


def test_trigger_evaluates_one_committed_checkpoint_now(run_copy, eval_config, loads):
    add_checkpoint_being_written(run_copy)
    cfg = eval_config(run_copy, **SMALL)
    for name in ("step_00000400.partial", "step_00000300"):
        with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
            trigger(checkpoint_dir(run_copy) / name, cfg)
    assert [r["step"] for r in trigger(checkpoint_dir(run_copy) / "step_00000100", cfg)] == [100]  # due or not
    assert trigger(checkpoint_dir(run_copy) / "step_00000100", cfg) == []
    assert loads == [("step_00000100", "ema")]


def test_submit_mode_runs_one_local_job_per_checkpoint(run_copy, eval_config):
    cfg = eval_config(run_copy, **SMALL, **{"eval.every": 1000, "eval.averaging": ["ema", "raw"]})
    cluster = ClusterConfig(kind="local", time_min=10, signal_delay_s=30)
    assert watch(run_copy, cfg, mode="submit", cluster=cluster, wait_for_jobs=True, poll_s=0.5, max_wait_s=240) == []
    records = read_results(run_copy)
    assert sorted((r["step"], r["averaging"]) for r in records) == [(250, "ema"), (250, "raw")]
    events = [json.loads(line) for line in work_path(run_copy).read_text().splitlines()]
    assert [e["event"] for e in events] == ["submitted", "submitted"]
    assert events[0]["job_id"] == events[1]["job_id"]  # both averagings of a checkpoint in one job
    assert (run_copy / "eval" / "submitit").is_dir()


def test_a_preempted_evaluation_job_resubmits_itself_whole(run_copy, eval_config):
    cfg = eval_config(run_copy, **SMALL)
    task = EvaluationTask(checkpoint_dir(run_copy) / "step_00000250", cfg, ["ema"], ["key"])
    resubmission = task.checkpoint()  # what submitit calls on preemption or the time limit
    assert isinstance(resubmission, submitit.helpers.DelayedSubmission) and resubmission.function is task
