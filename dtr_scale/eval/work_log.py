"""Who took which evaluation item: RUN_DIR/eval/work.jsonl, one event per line.

    claimed    an inline evaluator is evaluating it (host, pid, token)
    submitted  a submitit job evaluates it (job id, cluster kind, folder)
    failed     it raised; the error is kept and the item is not retried (retry_failed=True does)

A work item is one (step, averaging) under the evaluation settings; it is done when its
record is in RUN_DIR/eval/results.jsonl. An item is in flight while its claimant lives (a
process on this host, a claim of another host for a day, a job SLURM has not ended);
looking at its events and recording a claim happen under the run's evaluation lock, so of
several evaluators exactly one takes it.

The claims this process is working on right now are a set its evaluator owns and passes in
(`live`); any other claim of this process is one an evaluator here gave up (it raised).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import submitit

from dtr_scale.config import TrainConfig
from dtr_scale.eval.results import eval_lock, read_results
from dtr_scale.eval.settings import EvalSettings, eval_dir, record_key
from dtr_scale.io import append_jsonl, read_jsonl
from dtr_scale.launch.follow import SLURM_ACTIVE_STATES, slurm_state

WORK_NAME = "work.jsonl"
SLURM_ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE")
MAX_ATTEMPTS = 3  # claims/submissions of one item whose claimant died without a result
OTHER_HOST_CLAIM_S = 24 * 3600.0  # a claim from another host counts as dead after this long

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkItem:
    step: int
    checkpoint: Path
    averaging: str
    key: str  # JSON of the result key: the same string in results.jsonl's records and work.jsonl
    protocol: str = "full"


def work_path(run_dir: str | Path) -> Path:
    return eval_dir(run_dir) / WORK_NAME


def key_string(key: tuple) -> str:
    return json.dumps(list(key))


def work_items(points: list[tuple[int, Path, str]], cfg: TrainConfig) -> list[WorkItem]:
    """One item per averaging of each (step, checkpoint, protocol)."""
    settings = {protocol: EvalSettings.of(cfg, protocol) for protocol in {p for _, _, p in points}}
    return [WorkItem(step, path, spec, key_string(settings[protocol].result_key(step, spec)), protocol)
            for step, path, protocol in points for spec in cfg.eval.averaging]


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


def claim_alive(event: dict[str, Any], live: Collection[str] = ()) -> bool:
    if event["host"] != socket.gethostname():
        age = time.time() - event["unix_time"]
        return age < OTHER_HOST_CLAIM_S  # cannot look at another host's processes
    if event["pid"] == os.getpid():
        return event["token"] in live
    return pid_alive(event["pid"])


def job_alive(event: dict[str, Any]) -> bool:
    """Whether the submitit job of a 'submitted' event may still write the result."""
    if event["cluster"] == "local":
        return event["host"] != socket.gethostname() or pid_alive(int(event["job_id"]))  # local job id = its pid
    held = slurm_state(event["job_id"])  # slurmctld's own view: the accounting can read COMPLETED
    if held is not None:                  # between two runs of a requeued job
        return held in SLURM_ACTIVE_STATES
    state = submitit.SlurmJob(event["folder"], event["job_id"]).state  # slurmctld forgot it: ask the accounting
    return state.split(" ")[0] not in SLURM_ENDED  # UNKNOWN: sacct has not seen it yet


def in_flight(event: dict[str, Any], live: Collection[str] = ()) -> bool:
    if event["event"] == "claimed":
        return claim_alive(event, live)
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


def pending(run_dir: str | Path, items: list[WorkItem], *, retry_failed: bool = False,
            live: Collection[str] = ()) -> list[WorkItem]:
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
            if in_flight(event, live) or (event["event"] == "failed" and not retry_failed):
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


def claim(run_dir: str | Path, item: WorkItem, live: set[str], *, retry_failed: bool = False) -> str | None:
    """Take `item` for this process: its claim token, added to `live` (the caller discards it
    when done), or None when it is done or another evaluator holds it (checked and recorded in
    one critical section)."""
    with eval_lock(run_dir):
        if not pending(run_dir, [item], retry_failed=retry_failed, live=live):
            return None
        token = uuid.uuid4().hex
        live.add(token)
        record_event(run_dir, item.key, "claimed", token=token)
    return token


def all_settled(run_dir: str | Path, items: list[WorkItem], *, wait_for_jobs: bool,
                live: Collection[str] = ()) -> bool:
    """No item left to take; with wait_for_jobs also none still in flight."""
    if pending(run_dir, items, live=live):
        return False
    if not wait_for_jobs:
        return True
    done = done_keys(run_dir)
    last, _ = read_events(run_dir)
    return not any(in_flight(last[i.key], live) for i in items if i.key not in done and i.key in last)
