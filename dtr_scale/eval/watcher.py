"""Evaluate a run's checkpoints while it trains, without ever blocking it.

The watcher follows RUN_DIR/checkpoints and evaluates every complete checkpoint
(a manifest entry whose files are all there at their recorded sizes; a
`.partial` directory is never in the manifest) whose step is a multiple of
eval.every, and, once training has finished, the last one. A work item is one
(step, averaging) under the evaluation settings; it is done when its record is in
RUN_DIR/eval/results.jsonl. RUN_DIR/eval/work.jsonl records who took which item:

    claimed    an inline watcher is evaluating it (host, pid, token)
    submitted  a submitit job evaluates it (job id, cluster kind, folder)
    failed     it raised; the error is kept and the item is not retried (retry_failed=True does)

A restarted watcher skips items that are done or still in flight and takes over
those whose claimant died (dead pid, or an ended job) without a result: the
sampling resumes at the next missing chunk, so nothing is repeated or forgotten.
Taking an item (looking at its events and recording the claim) happens under the
run's evaluation lock, so of several evaluators on one run exactly one takes it; the
others move on to the next item and never wait for it.

Two modes: "inline" evaluates in this process (the embedded digits run);
"submit" sends one submitit job per checkpoint, local or SLURM, that evaluates
all of its averagings and requeues itself when preempted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import submitit

from dtr_scale.config import ClusterConfig, TrainConfig, parse_averaging
from dtr_scale.eval.averaging import run_dir_of
from dtr_scale.eval.evaluate import evaluate_averaging, evaluate_checkpoint, result_key
from dtr_scale.eval.results import eval_dir, eval_lock, read_results, record_key
from dtr_scale.io import append_jsonl, read_jsonl
from dtr_scale.launch.environment import export_distributed_env
from dtr_scale.launch.executor import make_executor
from dtr_scale.launch.ledger import ledger_path, read_status
from dtr_scale.train.checkpoint import complete_checkpoints
from dtr_scale.train.phema_snapshots import snapshot_name

WORK_NAME = "work.jsonl"
MODES = ("inline", "submit")
EVAL_MAX_REQUEUES = 20  # preemptions of one evaluation job; each resumes at the next missing chunk
SLURM_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")
MAX_ATTEMPTS = 3  # claims/submissions of one item whose claimant died without a result
OTHER_HOST_CLAIM_S = 24 * 3600.0  # a claim from another host counts as dead after this long
_LIVE_TOKENS: set[str] = set()  # claims this process is working on right now

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    step: int
    checkpoint: Path
    averaging: str
    key: str  # JSON of the result key: the same string in results.jsonl's records and work.jsonl


def work_path(run_dir: str | Path) -> Path:
    return eval_dir(run_dir) / WORK_NAME


def key_string(key: tuple) -> str:
    return json.dumps(list(key))


def work_items(checkpoints: list[tuple[int, Path]], cfg: TrainConfig) -> list[WorkItem]:
    return [WorkItem(step, path, spec, key_string(result_key(step, spec, cfg)))
            for step, path in checkpoints for spec in cfg.eval.averaging]


def due_checkpoints(run_dir: str | Path, every: int, *, include_latest: bool) -> list[tuple[int, Path]]:
    """Complete checkpoints at multiples of `every`, plus the newest one if include_latest."""
    complete = complete_checkpoints(run_dir)
    latest = complete[-1][0] if complete and include_latest else None
    return [(step, path) for step, path in complete if step % every == 0 or step == latest]


def training_finished(run_dir: str | Path, steps: int) -> bool:
    """No more checkpoints will come: the final step's checkpoint is complete, or the job
    ledger says the run finished or failed."""
    complete = complete_checkpoints(run_dir)
    if complete and complete[-1][0] >= steps:
        return True
    if not ledger_path(run_dir).exists():
        return False
    try:
        return read_status(run_dir)["state"] in ("finished", "failed")
    except FileNotFoundError:  # an empty ledger: no job has started yet
        return False


def pid_alive(pid: int) -> bool:
    """Whether process `pid` on this host is running (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def claim_alive(event: dict[str, Any]) -> bool:
    if event["host"] != socket.gethostname():
        age = time.time() - event["unix_time"]
        return age < OTHER_HOST_CLAIM_S  # cannot look at another host's processes
    if event["pid"] == os.getpid():
        return event["token"] in _LIVE_TOKENS
    return pid_alive(event["pid"])


def job_alive(event: dict[str, Any]) -> bool:
    """Whether the submitit job of a 'submitted' event may still write the result."""
    if event["cluster"] == "local":
        return event["host"] != socket.gethostname() or pid_alive(int(event["job_id"]))  # local job id = its pid
    state = submitit.SlurmJob(event["folder"], event["job_id"]).state
    return state.split(" ")[0] not in SLURM_ENDED  # UNKNOWN: sacct has not seen it yet


def in_flight(event: dict[str, Any]) -> bool:
    if event["event"] == "claimed":
        return claim_alive(event)
    if event["event"] == "submitted":
        return job_alive(event)
    return False


def read_events(run_dir: str | Path) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """(last event of each item, how many times each item was taken: claimed or submitted)."""
    last: dict[str, dict[str, Any]] = {}
    attempts: dict[str, int] = {}
    for event in read_jsonl(work_path(run_dir)):
        last[event["key"]] = event
        if event["event"] in ("claimed", "submitted"):
            attempts[event["key"]] = attempts.get(event["key"], 0) + 1
    return last, attempts


def done_keys(run_dir: str | Path) -> set[str]:
    return {key_string(record_key(r)) for r in read_results(run_dir)}


def pending(run_dir: str | Path, items: list[WorkItem], *, retry_failed: bool = False) -> list[WorkItem]:
    """The items with no result that nobody alive is working on. Failed ones only with
    retry_failed; one taken MAX_ATTEMPTS times already (its claimants keep dying) is left
    alone and logged."""
    done = done_keys(run_dir)
    last, attempts = read_events(run_dir)
    todo = []
    for item in items:
        event = last.get(item.key)
        if item.key in done:
            continue
        if event is not None:
            if in_flight(event) or (event["event"] == "failed" and not retry_failed):
                continue
            if attempts.get(item.key, 0) >= MAX_ATTEMPTS and not retry_failed:
                log.warning("step %d %s was taken %d times without a result (see %s); not retrying it",
                            item.step, item.averaging, attempts[item.key], work_path(run_dir))
                continue
        todo.append(item)
    return todo


def record_event(run_dir: str | Path, item_key: str, event: str, **fields: Any) -> dict[str, Any]:
    record = {"key": item_key, "event": event, "host": socket.gethostname(), "pid": os.getpid(),
              "unix_time": time.time(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields}
    append_jsonl(work_path(run_dir), record)
    return record


def snapshots_ready(run_dir: str | Path, item: WorkItem, cfg: TrainConfig) -> bool:
    """A 'phema' item waits for the snapshots of its own step, which the trainer writes just
    after the checkpoint; other items are ready at once."""
    kind, _ = parse_averaging(item.averaging)
    expected = cfg.phema_stds and (cfg.phema_every == 0 or item.step % cfg.phema_every == 0)
    if kind != "phema" or not expected:
        return True
    return all((Path(run_dir) / "phema" / snapshot_name(item.step, std)).exists() for std in cfg.phema_stds)


def claim(run_dir: str | Path, item: WorkItem, *, retry_failed: bool = False) -> str | None:
    """Take `item` for this process: its claim token, or None when it is done or another
    evaluator holds it (checked and recorded in one critical section)."""
    with eval_lock(run_dir):
        if not pending(run_dir, [item], retry_failed=retry_failed):
            return None
        token = uuid.uuid4().hex
        _LIVE_TOKENS.add(token)
        record_event(run_dir, item.key, "claimed", token=token)
    return token


def evaluate_inline(run_dir: str | Path, item: WorkItem, cfg: TrainConfig, *, progress: bool = False,
                    retry_failed: bool = False) -> dict | None:
    """Claim and evaluate one item here; a failure is recorded (and logged), not raised. An item
    another evaluator took meanwhile is left to it (None)."""
    token = claim(run_dir, item, retry_failed=retry_failed)
    if token is None:
        log.info("step %d %s is taken by another evaluator; moving on", item.step, item.averaging)
        return None
    try:
        return evaluate_averaging(item.checkpoint, item.averaging, cfg, rank=0, world_size=1, progress=progress)
    except Exception as err:  # one bad item (e.g. window:k too early) must not stop the watcher
        log.exception("evaluating step %d %s failed", item.step, item.averaging)
        record_event(run_dir, item.key, "failed", error=f"{type(err).__name__}: {err}")
        return None
    finally:
        _LIVE_TOKENS.discard(token)


class EvaluationTask(submitit.helpers.Checkpointable):
    """What an evaluation job runs: every given averaging of one checkpoint, on all its tasks
    (each samples its chunks, task 0 merges and scores). Requeued on preemption; the requeued
    job resumes at the next missing chunk."""

    def __init__(self, checkpoint: Path, cfg: TrainConfig, averaging: list[str], keys: list[str]) -> None:
        # not `self.checkpoint`: that is the method submitit calls on preemption
        self.checkpoint_path, self.cfg, self.averaging, self.keys = checkpoint, cfg, averaging, keys

    def __call__(self) -> list[dict]:
        job = submitit.JobEnvironment()
        export_distributed_env(job)
        run_dir = run_dir_of(self.checkpoint_path)
        try:
            return evaluate_checkpoint(self.checkpoint_path, self.cfg, averaging=self.averaging)
        except Exception as err:
            if job.global_rank == 0:
                for key in self.keys:
                    record_event(run_dir, key, "failed", error=f"{type(err).__name__}: {err}", job_id=job.job_id)
            raise

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def eval_cluster(cfg: TrainConfig, cluster: ClusterConfig | None = None) -> ClusterConfig:
    """The cluster for evaluation jobs: `cluster`, else the run's, else local processes; with
    eval.world_size tasks on one node (one per GPU where it has GPUs)."""
    base = cluster or cfg.cluster or ClusterConfig(kind="local")
    tasks = cfg.eval.world_size
    return dataclasses.replace(base, nodes=1, tasks_per_node=tasks, gpus_per_node=tasks if base.gpus_per_node else 0,
                               job_name=f"{base.job_name}-eval",
                               max_requeues=base.max_requeues if base.max_requeues is not None else EVAL_MAX_REQUEUES)


def submit_items(run_dir: str | Path, items: list[WorkItem], cfg: TrainConfig,
                 cluster: ClusterConfig | None = None, *, retry_failed: bool = False) -> list[submitit.Job]:
    """One job per checkpoint for its items that are still pending; each is recorded as submitted
    with the job id. Looking, submitting and recording happen under the evaluation lock, so two
    evaluators never submit the same item."""
    cluster = eval_cluster(cfg, cluster)
    folder = Path(cluster.folder or eval_dir(run_dir) / "submitit") / "%j"
    executor = make_executor(cluster, folder, cfg.steps)
    jobs = []
    for checkpoint in sorted({item.checkpoint for item in items}):
        with eval_lock(run_dir):
            group = pending(run_dir, [i for i in items if i.checkpoint == checkpoint], retry_failed=retry_failed)
            if not group:
                continue
            task = EvaluationTask(checkpoint, cfg, [i.averaging for i in group], [i.key for i in group])
            job = executor.submit(task)
            for item in group:
                record_event(run_dir, item.key, "submitted", job_id=job.job_id, cluster=cluster.kind,
                             folder=str(folder))
        log.info("submitted evaluation of %s (%s) as job %s", checkpoint.name,
                 ", ".join(i.averaging for i in group), job.job_id)
        jobs.append(job)
    return jobs


def process(run_dir: str | Path, items: list[WorkItem], cfg: TrainConfig, *, mode: str,
            cluster: ClusterConfig | None, stop: Callable[[], bool], progress: bool,
            retry_failed: bool = False) -> list[dict]:
    """Evaluate (inline) or submit (submit) the items; the records made here."""
    if mode == "submit":
        submit_items(run_dir, items, cfg, cluster, retry_failed=retry_failed)
        return []
    records = []
    for item in items:
        if stop():
            break
        record = evaluate_inline(run_dir, item, cfg, progress=progress, retry_failed=retry_failed)
        if record is not None:
            records.append(record)
    return records


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"watcher mode {mode!r} is not one of {', '.join(MODES)}")


def sweep(run_dir: str | Path, cfg: TrainConfig, *, mode: str = "inline", finished: bool | None = None,
          cluster: ClusterConfig | None = None, retry_failed: bool = False, stop: Callable[[], bool] | None = None,
          progress: bool = False) -> list[dict]:
    """One pass over the checkpoints there now: evaluate (inline) or submit every pending due
    item; returns the records made here. `finished` (default: whether training has finished)
    adds the newest checkpoint and stops waiting for post-hoc EMA snapshots still to come."""
    check_mode(mode)
    finished = training_finished(run_dir, cfg.steps) if finished is None else finished
    items = work_items(due_checkpoints(run_dir, cfg.eval.every, include_latest=finished), cfg)
    todo = [i for i in pending(run_dir, items, retry_failed=retry_failed) if finished or snapshots_ready(run_dir, i, cfg)]
    return process(run_dir, todo, cfg, mode=mode, cluster=cluster, stop=stop or (lambda: False), progress=progress,
                   retry_failed=retry_failed)


def watch(run_dir: str | Path, cfg: TrainConfig, *, mode: str = "inline", cluster: ClusterConfig | None = None,
          poll_s: float = 10.0, max_wait_s: float | None = None, stop: Callable[[], bool] | None = None,
          wait_for_jobs: bool = False, retry_failed: bool = False, progress: bool = False) -> list[dict]:
    """Evaluate `run_dir`'s due checkpoints as they appear, with the evaluation settings of
    `cfg` (cfg.steps is the run's last step). Polls every poll_s seconds; returns the records
    made in this process when training has finished and every due item is evaluated (submit
    mode: submitted, or with wait_for_jobs, evaluated), when `stop()` is true, or after
    max_wait_s seconds."""
    check_mode(mode)
    stop = stop or (lambda: False)
    deadline = time.monotonic() + max_wait_s if max_wait_s is not None else None
    records: list[dict] = []
    while True:
        finished = training_finished(run_dir, cfg.steps)  # read before listing, so the final checkpoint is listed
        records += sweep(run_dir, cfg, mode=mode, finished=finished, cluster=cluster, retry_failed=retry_failed,
                         stop=stop, progress=progress)
        retry_failed = False  # this watcher's own failures are not retried in a loop
        items = work_items(due_checkpoints(run_dir, cfg.eval.every, include_latest=finished), cfg)
        if finished and all_settled(run_dir, items, wait_for_jobs=mode == "inline" or wait_for_jobs):
            log.info("training finished and its checkpoints are evaluated; the watcher stops")
            return records
        if stop() or (deadline is not None and time.monotonic() >= deadline):
            return records
        time.sleep(poll_s)


def all_settled(run_dir: str | Path, items: list[WorkItem], *, wait_for_jobs: bool) -> bool:
    """No item left to take; with wait_for_jobs also none still in flight."""
    if pending(run_dir, items):
        return False
    if not wait_for_jobs:
        return True
    done = done_keys(run_dir)
    last, _ = read_events(run_dir)
    return not any(in_flight(last[i.key]) for i in items if i.key not in done and i.key in last)


def submit_at_save(cfg: TrainConfig) -> Callable[[Path, int], None] | None:
    """eval.at_save: the trainer's checkpoint hook that submits an evaluation job for each due
    checkpoint (a multiple of eval.every, or the last step) once it is complete."""
    if not cfg.eval.at_save:
        return None

    def on_commit(checkpoint: Path, step: int) -> None:
        if step % cfg.eval.every and step != cfg.steps:
            return
        try:
            trigger(checkpoint, cfg, mode="submit", cluster=cfg.cluster)
        except Exception as err:  # an evaluation that cannot be submitted must not stop training
            log.warning("could not submit the evaluation of %s (%s: %s); `dtr-scale eval run_dir=%s` scores it later",
                        checkpoint, type(err).__name__, err, cfg.run_dir)

    return on_commit


def trigger(checkpoint: str | Path, cfg: TrainConfig, *, mode: str = "inline",
            cluster: ClusterConfig | None = None, progress: bool = False, retry_failed: bool = False) -> list[dict]:
    """Evaluate (or submit) one checkpoint now, e.g. from the trainer right after it saved;
    items already done or in flight are skipped (failed ones too, unless retry_failed).
    Returns the records made inline."""
    check_mode(mode)
    checkpoint = Path(checkpoint)
    run_dir = run_dir_of(checkpoint)
    step = dict((p.name, s) for s, p in complete_checkpoints(run_dir)).get(checkpoint.name)
    if step is None:
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint of {run_dir} (not in its manifest, or "
                                "its files do not match it); trigger an evaluation after the checkpoint is committed")
    items = pending(run_dir, work_items([(step, checkpoint)], cfg), retry_failed=retry_failed)
    return process(run_dir, items, cfg, mode=mode, cluster=cluster, stop=lambda: False, progress=progress,
                   retry_failed=retry_failed)


@dataclass(frozen=True)
class Failure:
    step: int
    averaging: str
    error: str


def failures(run_dir: str | Path, cfg: TrainConfig, checkpoint: str | Path | None = None) -> list[Failure]:
    """The items (of `checkpoint`, else every due one and the newest) whose last attempt failed
    and that have no result: what `dtr-scale eval` lists and --retry-failed tries again."""
    if checkpoint is not None:
        steps = dict((p.name, s) for s, p in complete_checkpoints(run_dir))
        checkpoints = [(steps[Path(checkpoint).name], Path(checkpoint))] if Path(checkpoint).name in steps else []
    else:
        checkpoints = due_checkpoints(run_dir, cfg.eval.every, include_latest=True)
    done = done_keys(run_dir)
    last, _ = read_events(run_dir)
    return [Failure(item.step, item.averaging, last[item.key].get("error", "?"))
            for item in work_items(checkpoints, cfg)
            if item.key not in done and item.key in last and last[item.key]["event"] == "failed"]


def failures_message(failed: list[Failure]) -> str:
    """What `dtr-scale eval` prints (to stderr, exiting non-zero) when items failed."""
    lines = [f"  step {f.step} {f.averaging}: {f.error}" for f in failed]
    return (f"dtr-scale eval: {len(failed)} evaluation(s) failed:\n" + "\n".join(lines) +
            "\nfix the cause and run the same command with --retry-failed to evaluate them again")
