"""`dtr-scale status RUN_DIR`: a run's jobs, its last complete checkpoint, its
throughput, its provenance and its evaluation results, read from the run directory alone.
People poll it from login nodes: nothing on this path imports torch (the evaluation
results are plain JSON)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dtr_scale.eval.results import last_evaluation
from dtr_scale.launch.ledger import ledger_path, read_status
from dtr_scale.provenance import format_provenance, read_provenance
from dtr_scale.train.manifest import latest_checkpoint, read_meta
from dtr_scale.train.metrics import last_logged
from dtr_scale.train.progress import format_clock, loss_text, progress, progress_text, throughput_text


def run_status(run_dir: str | Path, now: float | None = None) -> dict[str, Any]:
    """Everything the status command shows, as plain data; the ETA counts from `now` (default: now)."""
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
    status["checkpoint_time"] = Path(ckpt).stat().st_mtime if ckpt else None
    last = status["last_logged"]
    status["progress"] = progress(last, time.time() if now is None else now) if last else None
    status["last_eval"] = last_evaluation(run_dir)
    status["provenance"] = read_provenance(run_dir)
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
        per_device = throughput_text(last)
        lines.append(f"training   step {last['step']}, {loss_text(last)}, {last['images_per_s']:.1f} images/s"
                     f"{f' ({per_device})' if per_device else ''}, {last['images_seen']} images seen")
    lines += progress_lines(status)
    lines += format_provenance(status.get("provenance", []))
    if status["jobs"]:
        lines += ["", "jobs:"]
        for record in status["jobs"]:
            detail = " ".join(f"{k}={record[k]}" for k in ("start_step", "end_step", "reason", "error")
                              if record.get(k) is not None)
            lines.append(f"  {record['time']}  {record.get('job_id', '?'):>10}  {record['state']:<9} {detail}")
    if results:
        lines += ["", "evaluation:", results]
    return "\n".join(lines)


def progress_lines(status: dict[str, Any]) -> list[str]:
    """Percent done and ETA from the measured step rate (no ETA for a job that is not running),
    when the last checkpoint was written, and the newest evaluation's main metric."""
    lines = []
    info = status.get("progress")
    if info:
        stalled = status["state"] in ("failed", "requeued", "finished")
        text = progress_text(info | {"eta_s": None} if stalled else info)
        if info["finish_time"] is not None and not stalled and info["eta_s"]:
            text += f" (about {format_clock(info['finish_time'])})"
        if info["steps_per_s"]:
            text += f", {info['steps_per_s']:.2f} steps/s"
        lines.append(f"progress   {text}")
    if status.get("checkpoint_time") is not None:
        lines.append(f"saved      step {status['checkpoint_step']} at {format_clock(status['checkpoint_time'])}")
    last_eval = status.get("last_eval")
    if last_eval:
        lines.append(f"evaluated  {last_eval['text']}")
    return lines
