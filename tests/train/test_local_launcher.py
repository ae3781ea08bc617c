"""The single-machine multi-process launcher listens on loopback only, and every rank's
log lines reach the console, tagged with the rank."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from dtr_scale.train.local import run_processes

LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net/tcp writes them


def child_pids() -> set[int]:
    pids = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            pids |= {int(p) for p in (task / "children").read_text().split()}
        except OSError:
            continue
    return pids


def listening_addresses(pids: set[int]) -> set[str]:
    """Local addresses of the TCP sockets that processes `pids` listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
        except OSError:
            continue  # the process ended meanwhile
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # state LISTEN
                found.add(fields[1])
    return found


def test_two_local_ranks_listen_on_loopback_and_both_log_tagged_lines(tiny_config, tmp_path, capfd):
    # ranks agree on a stop every STOP_POLL_EVERY (4) steps: stop at step 4 with a checkpoint there
    cfg = tiny_config(run_dir=str(tmp_path / "run"), steps=8, world_size=2, phema_stds=[],
                      **{"checkpoint.every": 4})
    run_processes(cfg, 2, stop_at=4)  # a checkpoint at step 4, for the resume below
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(listening_addresses(child_pids()))
            done.wait(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_processes(cfg, 2)
    finally:
        done.set()
        watcher.join()
    assert seen, "no listening socket of the ranks was seen"
    assert {address.split(":")[0] for address in seen} <= LOOPBACK, seen
    err = capfd.readouterr().err
    for rank in (0, 1):
        assert any(line.startswith(f"[rank {rank}]") and "resumed at step 4" in line
                   for line in err.splitlines()), err[-3000:]
