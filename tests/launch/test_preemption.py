"""The preemption signal only asks the loop to stop; requeue hands over to submitit."""

from __future__ import annotations

import os
import signal

import pytest

from dtr_scale.launch.preemption import PreemptionSignal


@pytest.fixture
def submitit_handler():
    """Stand in for the handler submitit binds to USR2 in a job; records its calls."""
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def test_signal_sets_the_stop_flag_only(submitit_handler):
    preemption = PreemptionSignal()
    assert not preemption.requested()
    os.kill(os.getpid(), signal.SIGUSR2)
    assert preemption.requested()
    assert submitit_handler == []  # no checkpoint or requeue in the middle of a step


def test_requeue_calls_submitit_then_exits_cleanly(submitit_handler):
    preemption = PreemptionSignal()
    with pytest.raises(SystemExit) as exit_info:
        preemption.requeue()
    assert submitit_handler == [signal.SIGUSR2]
    assert exit_info.value.code == 0


def test_outside_a_submitit_job_it_says_so():
    previous = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        with pytest.raises(RuntimeError, match="submitit"):
            PreemptionSignal()
    finally:
        signal.signal(signal.SIGUSR2, previous)
