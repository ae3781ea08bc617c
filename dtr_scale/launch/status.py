"""`dtr-scale status RUN_DIR`: a run's jobs, its last complete checkpoint, its
throughput and its evaluation results, read from the run directory alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dtr_scale.launch.ledger import ledger_path, read_status
from dtr_scale.train.checkpoint import latest_checkpoint, read_meta
from dtr_scale.train.metrics import last_logged


def run_status(run_dir: str | Path) -> dict[str, Any]:
    """Everything the status command shows, as plain data."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory at {run_dir}")
    status: dict[str, Any] = {"run_dir": str(run_dir), "jobs": [], "state": "not launched (trained in-process)"}
    if ledger_path(run_dir).exists():
        status |= read_status(run_dir)
    ckpt = latest_checkpoint(run_dir)
    status["checkpoint"] = str(ckpt) if ckpt else None
    status["checkpoint_step"] = read_meta(ckpt)["step"] if ckpt else None
    status["last_logged"] = last_logged(run_dir)
    return status


def format_status(status: dict[str, Any], results: str | None = None) -> str:
    lines = [f"run        {status['run_dir']}", f"state      {status['state']}"]
    if status["jobs"]:
        lines.append(f"job        {status['job_id']} (requeued {status['requeues']} times)")
    if status.get("error"):
        lines += [f"error      {status['error']}", f"log        {status['log']}"]
    step = status["checkpoint_step"]
    lines.append(f"checkpoint {status['checkpoint']} (step {step})" if step is not None
                 else "checkpoint none complete yet")
    last = status["last_logged"]
    if last:
        lines.append(f"training   step {last['step']}, loss {last['loss']:.4f}, {last['images_per_s']:.1f} images/s, "
                     f"{last['images_seen']} images seen")
    if status["jobs"]:
        lines += ["", "jobs:"]
        for record in status["jobs"]:
            detail = " ".join(f"{k}={record[k]}" for k in ("start_step", "end_step", "reason", "error")
                              if record.get(k) is not None)
            lines.append(f"  {record['time']}  {record.get('job_id', '?'):>10}  {record['state']:<9} {detail}")
    if results:
        lines += ["", "evaluation:", results]
    return "\n".join(lines)
