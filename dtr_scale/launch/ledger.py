"""The job ledger: one JSON line per job event in <run_dir>/jobs.jsonl.

States: "running" (a job started), "requeued" (stopped at a complete
checkpoint for a preemption or the time limit, and requeued), "finished",
"failed" (the training code raised; the job is not requeued). A job killed
outside Python (out of memory, scancel, node failure) leaves its last line
"running"; `sacct -j JOB_ID` tells what happened to it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dtr_scale.io import append_jsonl, read_jsonl

LEDGER_NAME = "jobs.jsonl"
STATES = ("running", "requeued", "finished", "failed")


def ledger_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LEDGER_NAME


def append_record(run_dir: str | Path, state: str, **fields: Any) -> dict[str, Any]:
    """Append one event; a single O_APPEND write, so ranks that write at once do not interleave,
    and after a line torn by a killed writer the event starts on a line of its own."""
    if state not in STATES:
        raise ValueError(f"ledger state {state!r} is not one of {', '.join(STATES)}")
    record = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "state": state, **fields}
    append_jsonl(ledger_path(run_dir), record)
    return record


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    path = ledger_path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"no job ledger at {path}: {run_dir} has not been launched through "
                                "dtr_scale.launch (or the path is not the run's run_dir)")
    return read_jsonl(path)  # a line cut short by a killed writer is skipped


def last_step(records: list[dict[str, Any]]) -> int:
    """The latest step a job reported reaching (0 before any job ended)."""
    steps = [r["end_step"] for r in records if r.get("end_step") is not None]
    return max(steps, default=0)


def read_status(run_dir: str | Path) -> dict[str, Any]:
    """What `dtr-scale status RUN_DIR` shows: the run's state, step, job, requeues and error."""
    records = read_records(run_dir)
    if not records:
        raise FileNotFoundError(f"the job ledger {ledger_path(run_dir)} is empty; no job of this run has started")
    last = records[-1]
    # The first failure after the last start is the cause; other ranks fail in its wake
    # (the failing rank records its error before its exit breaks their collectives).
    starts = [i for i, r in enumerate(records) if r["state"] == "running"]
    segment = records[starts[-1]:] if starts else records
    failures = [r for r in segment if r["state"] == "failed"]
    cause = failures[0] if last["state"] == "failed" and failures else None
    return {
        "run_dir": str(run_dir),
        "state": last["state"],
        "job_id": last.get("job_id"),
        "step": last_step(records),
        "requeues": last.get("requeues", 0),
        "error": cause.get("error") if cause else None,
        "errors": {r.get("rank"): r.get("error") for r in failures} if cause else {},
        "log": (cause or last).get("log"),
        "jobs": records,
    }
