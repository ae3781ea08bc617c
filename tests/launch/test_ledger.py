"""The job ledger and the status read from it."""

from __future__ import annotations

import pytest

from dtr_scale.launch.ledger import append_record, ledger_path, read_records, read_status


def test_status_follows_requeues_to_the_end(tmp_path):
    append_record(tmp_path, "running", job_id="7", requeues=0, start_step=0)
    append_record(tmp_path, "requeued", job_id="7", requeues=0, start_step=0, end_step=120, reason="preempted")
    append_record(tmp_path, "running", job_id="7", requeues=1, start_step=120)
    status = read_status(tmp_path)
    assert (status["state"], status["step"], status["requeues"], status["error"]) == ("running", 120, 1, None)
    append_record(tmp_path, "finished", job_id="7", requeues=1, start_step=120, end_step=400)
    assert (read_status(tmp_path)["state"], read_status(tmp_path)["step"]) == ("finished", 400)


def test_status_shows_the_first_error_of_the_failed_job(tmp_path):
    append_record(tmp_path, "running", job_id="8", requeues=0, start_step=0, log="8_0_log.err")
    append_record(tmp_path, "failed", job_id="8", rank=1, error="ValueError: bad shard 3", log="8_1_log.err")
    append_record(tmp_path, "failed", job_id="8", rank=0, error="RuntimeError: Connection reset by peer")
    status = read_status(tmp_path)
    assert (status["state"], status["error"], status["log"]) == ("failed", "ValueError: bad shard 3", "8_1_log.err")
    assert status["errors"] == {1: "ValueError: bad shard 3", 0: "RuntimeError: Connection reset by peer"}


def test_a_line_cut_short_is_skipped(tmp_path):
    append_record(tmp_path, "running", job_id="9", requeues=0, start_step=0)
    with ledger_path(tmp_path).open("a") as f:
        f.write('{"time": "2026-')
    assert [r["state"] for r in read_records(tmp_path)] == ["running"]


def test_missing_ledger_and_unknown_state_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no job ledger"):
        read_status(tmp_path)
    with pytest.raises(ValueError, match="not one of"):
        append_record(tmp_path, "exploded")


def test_a_writer_killed_mid_line_loses_only_its_own_record(tmp_path):
    import signal
    import subprocess
    import sys

    append_record(tmp_path, "running", job_id="10", requeues=0, start_step=0)
    # a writer that has written half of its line when it is killed
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time\n"
        f"fd = os.open({str(ledger_path(tmp_path))!r}, os.O_WRONLY | os.O_APPEND)\n"
        "os.write(fd, b'{\"time\": \"2026-12-01T00:00:00+00:00\", \"state\": \"requeu')\n"
        "print('written', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "written"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    append_record(tmp_path, "finished", job_id="10", requeues=0, start_step=0, end_step=400)
    records = read_records(tmp_path)
    assert [(r["state"], r.get("end_step")) for r in records] == [("running", None), ("finished", 400)]
    assert read_status(tmp_path)["state"] == "finished"
