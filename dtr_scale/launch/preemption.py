"""Preemption and time limits inside a submitit job.

submitit binds the preemption signal (USR2, sent by SLURM at preemption or
`signal_delay_s` before the time limit) to a handler that checkpoints and
requeues at once, whatever the training loop is doing. `PreemptionSignal`
replaces that binding with one that only records the signal, so the loop can
stop at the next step boundary after a complete checkpoint; then `requeue()`
calls submitit's saved handler, which asks the task for its resubmission
(`checkpoint()`), counts time-limit requeues against the budget and requeues.
"""

from __future__ import annotations

import signal
import sys
from typing import NoReturn

import submitit


class PreemptionSignal:
    """Install after submitit's own handler (i.e. inside the submitted callable)."""

    def __init__(self) -> None:
        self.signum = signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]
        self._submitit_handler = signal.getsignal(self.signum)
        if not callable(self._submitit_handler):
            raise RuntimeError(f"no submitit handler on {self.signum.name}: PreemptionSignal works only inside "
                               "a job started by a submitit executor (dtr_scale.launch.submit_training)")
        self.received = False
        signal.signal(self.signum, self._record)

    def _record(self, signum: int, frame: object) -> None:
        self.received = True

    def requested(self) -> bool:
        return self.received

    def timed_out(self) -> bool:
        """submitit's reading: the job ran past min(0.8 x limit, limit - 10 min), so the
        signal is the time limit's rather than a preemption's."""
        owner = getattr(self._submitit_handler, "__self__", None)
        return bool(owner is not None and owner.has_timed_out())

    def requeue(self) -> NoReturn:
        """Hand the stopped job to submitit: rank 0 dumps the task's `checkpoint()`
        resubmission and requeues the job (or raises submitit's UncompletedJobError when
        the time-limit budget is spent); every rank then exits without a result."""
        self._submitit_handler(self.signum, None)
        # Exit code 0: a non-zero one would make srun --kill-on-bad-exit end rank 0 mid-requeue.
        sys.exit(0)
