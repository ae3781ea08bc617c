"""Stay attached to a submitted training job: a progress bar fed by the run's
metrics, a hook for work beside it (inline evaluation), and its outcome.

Ctrl-C cancels the job; its checkpoints stay, so the same command resumes it.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import submitit
from tqdm import tqdm

from dtr_scale.launch.ledger import ledger_path, read_records, read_status
from dtr_scale.train.metrics import last_logged
from dtr_scale.train.progress import loss_fields

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """The training job ended without finishing; the message says why and where its log is."""


# SLURM states (squeue --states=all) of a job that SLURM still holds: it runs, or it runs again.
SLURM_ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
    "RESIZING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD",
})
# After the ledger's "requeued", SLURM shows the job pending again within seconds; this long a
# terminal reading with no new start means the requeue did not happen.
REQUEUE_GRACE_S = 120.0


def slurm_state(job_id: str) -> str | None:
    """The job's state as slurmctld holds it now (squeue, no accounting cache); None once SLURM
    has forgotten the job (MinJobAge) or where squeue cannot answer."""
    try:
        out = subprocess.run(["squeue", "--noheader", "--states=all", "--jobs", str(job_id), "--format=%T"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def job_over(job: submitit.Job, run_dir: str | Path | None = None) -> bool:
    """Whether `job` has ended for good, so that job.results() has its answer.

    submitit's done() trusts one accounting reading and caches it: a job that requeues itself
    (preemption, time limit) can read COMPLETED for a moment between its runs, and done() then
    stays True while SLURM starts it again. So a terminal reading counts only once every task's
    result is written, or SLURM itself no longer holds the job and the run's ledger (when given)
    does not say "requeued" within the last REQUEUE_GRACE_S seconds."""
    if not job.done():
        return False
    if all(job.task(i).paths.result_pickle.exists() for i in range(job.num_tasks)):  # one result per task
        return True
    if isinstance(job, submitit.SlurmJob) and slurm_state(job.job_id) in SLURM_ACTIVE_STATES:
        return False
    if run_dir is not None and ledger_path(run_dir).exists():
        records = read_records(run_dir)
        if records and records[-1]["state"] == "requeued":
            since = datetime.now(timezone.utc) - datetime.fromisoformat(records[-1]["time"])
            return since.total_seconds() > REQUEUE_GRACE_S
    return True


def _progress(run_dir: Path, bar: tqdm) -> None:
    last = last_logged(run_dir)
    if last is not None:
        bar.update(last["step"] - bar.n)
        bar.set_postfix(loss_fields(last), img_s=f"{last['images_per_s']:.0f}", refresh=False)
    if ledger_path(run_dir).exists():
        status = read_status(run_dir)
        bar.set_description(f"job {status['job_id']} {status['state']}"
                            + (f" (requeued {status['requeues']}x)" if status["requeues"] else ""))


def follow_job(job: submitit.Job, run_dir: str | Path, steps: int, *,
               beside: Callable[[], None] | None = None, poll_s: float = 2.0) -> dict:
    """Wait for `job`, showing its progress and calling `beside()` every poll; return the
    ledger's final status, or raise JobFailed with the job's error and log."""
    run_dir = Path(run_dir)
    try:
        with tqdm(total=steps, unit="step", dynamic_ncols=True) as bar:
            while not job_over(job, run_dir):
                _progress(run_dir, bar)
                if beside is not None:
                    beside()
                time.sleep(poll_s)
            _progress(run_dir, bar)
    except KeyboardInterrupt:
        job.cancel(check=False)
        log.warning("cancelled job %s; the run resumes from its last checkpoint with the same run_dir=%s",
                    job.job_id, run_dir)
        raise
    try:
        job.results()
    except Exception as err:
        status = read_status(run_dir) if ledger_path(run_dir).exists() else {}
        raise JobFailed(f"job {job.job_id} failed: {status.get('error') or err}\n"
                        f"  log: {status.get('log') or job.paths.stderr}\n"
                        f"  status: dtr-scale status {run_dir}") from None
    return read_status(run_dir)
