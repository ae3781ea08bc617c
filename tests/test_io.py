"""Writes that survive a killed writer: atomic replacement, appends with a torn-line guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dtr_scale.io import (CorruptFileError, append_jsonl, atomic_write, atomic_write_json, read_json,
                          read_jsonl, rewrite_jsonl, temp_path)


def test_atomic_write_json_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert read_json(path) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_a_failing_writer_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"old": True})

    def half_then_fail(f):
        f.write(b'{"new": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert read_json(path) == {"old": True}
    assert not temp_path(path).exists()


def test_a_killed_writer_leaves_the_old_file(tmp_path):
    # SIGKILL in the middle of writing the temporary file: the target is untouched.
    path = tmp_path / "m.json"
    atomic_write_json(path, {"old": True})
    script = ("import os, signal\n"
              "from dtr_scale.io import atomic_write\n"
              "def w(f):\n"
              "    f.write(b'{\"new\": ')\n"
              "    f.flush()\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              f"atomic_write({str(path)!r}, w)\n")
    result = subprocess.run([sys.executable, "-c", script])
    assert result.returncode == -9
    assert read_json(path) == {"old": True}


def test_read_json_names_a_corrupt_file(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text('{"step": 1')
    with pytest.raises(CorruptFileError, match="meta.json is not valid JSON"):
        read_json(path)


def test_append_after_a_torn_line_loses_only_that_line(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # a writer killed mid-line
    append_jsonl(path, {"step": 3})
    assert path.read_text().splitlines()[-1] == json.dumps({"step": 3})
    assert read_jsonl(path) == [{"step": 1}, {"step": 3}]


def test_read_jsonl_of_a_missing_file_is_empty(tmp_path):
    assert read_jsonl(tmp_path / "none.jsonl") == []


def test_rewrite_jsonl_replaces_the_records(tmp_path):
    path = tmp_path / "log.jsonl"
    for step in range(5):
        append_jsonl(path, {"step": step})
    rewrite_jsonl(path, [r for r in read_jsonl(path) if r["step"] <= 2])
    assert read_jsonl(path) == [{"step": 0}, {"step": 1}, {"step": 2}]
    append_jsonl(path, {"step": 3})
    assert [r["step"] for r in read_jsonl(path)] == [0, 1, 2, 3]


def test_concurrent_appends_do_not_interleave(tmp_path):
    path = tmp_path / "log.jsonl"
    script = ("import sys\nfrom dtr_scale.io import append_jsonl\n"
              "for i in range(200): append_jsonl(sys.argv[1], {'w': sys.argv[2], 'i': i, 'pad': 'x' * 300})\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(w)]) for w in range(2)]
    assert all(p.wait() == 0 for p in procs)
    records = read_jsonl(path)
    assert len(records) == 400
    assert {(r["w"], r["i"]) for r in records} == {(str(w), i) for w in range(2) for i in range(200)}
    assert os.path.getsize(path) == sum(len(json.dumps(r)) + 1 for r in records)
