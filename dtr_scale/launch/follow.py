"""Stay attached to a submitted training job: a progress bar fed by the run's
metrics, a hook for work beside it (inline evaluation), and its outcome.

Ctrl-C cancels the job; its checkpoints stay, so the same command resumes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import submitit
from tqdm import tqdm

from dtr_scale.launch.ledger import ledger_path, read_status
from dtr_scale.train.metrics import last_logged

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """The training job ended without finishing; the message says why and where its log is."""


def _progress(run_dir: Path, bar: tqdm) -> None:
    last = last_logged(run_dir)
    if last is not None:
        bar.update(last["step"] - bar.n)
        bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.0f}", refresh=False)
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
            while not job.done():
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
