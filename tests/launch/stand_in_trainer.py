"""A stand-in for dtr_scale.train.loop.train with the same interface, cheap enough
for end-to-end job tests: every step sleeps, all-reduces a number over gloo and
folds it into a state; every rank logs the steps it trained; rank 0 writes an
atomic checkpoint every `ckpt_every` steps, at a stop and at the end.

A step trained twice shows as a repeated line in a rank's step log, and a
resume from anything but the stop's checkpoint changes the final state.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

MODULUS = 2**61 - 1


@dataclass
class StandInConfig:
    run_dir: str
    steps: int = 20
    world_size: int = 2
    step_seconds: float = 0.2
    ckpt_every: int = 1000  # rarely: only a clean stop's checkpoint prevents retraining
    fail_at_step: int | None = None  # raise a RuntimeError on rank 0 at this step


@dataclass
class TrainResult:
    status: str
    step: int


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoint.json"


def step_log(run_dir: str | Path, rank: int) -> Path:
    return Path(run_dir) / f"steps.rank{rank}.log"


def read_checkpoint(run_dir: str | Path) -> dict:
    path = checkpoint_path(run_dir)
    return json.loads(path.read_text()) if path.exists() else {"step": 0, "state": 0}


def logged_steps(run_dir: str | Path, rank: int) -> list[int]:
    path = step_log(run_dir, rank)
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _save(run_dir: Path, step: int, state: int) -> None:
    tmp = checkpoint_path(run_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps({"step": step, "state": state}))
    os.replace(tmp, checkpoint_path(run_dir))


def train(cfg: StandInConfig, *, stop_requested: Callable[[], bool] | None = None) -> TrainResult:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    assert world == cfg.world_size, f"WORLD_SIZE={world}, config says {cfg.world_size}"
    dist.init_process_group("gloo", rank=rank, world_size=world)
    run_dir = Path(cfg.run_dir)
    ckpt = read_checkpoint(run_dir)
    step, state = ckpt["step"], ckpt["state"]

    def save_all(at: int) -> None:
        if rank == 0:
            _save(run_dir, at, state)
        dist.barrier()  # complete on disk before any rank moves on

    # Like the real loop, an error leaves the process group to process exit, so the
    # failing rank reports before the others notice.
    while step < cfg.steps:
        stop = torch.tensor([float(bool(stop_requested and stop_requested()))])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item():
            save_all(step)
            dist.destroy_process_group()
            return TrainResult("stopped", step)
        step += 1
        time.sleep(cfg.step_seconds)
        if cfg.fail_at_step == step and rank == 0:
            raise RuntimeError(f"stand-in trainer failed on purpose at step {step}")
        contribution = torch.tensor([float((rank + 1) * step)])
        dist.all_reduce(contribution)
        state = (state * 31 + int(contribution.item())) % MODULUS
        with step_log(run_dir, rank).open("a") as log:
            log.write(f"{step}\n")
        if step % cfg.ckpt_every == 0:
            save_all(step)
    save_all(step)
    dist.destroy_process_group()
    return TrainResult("finished", step)


def expected_state(steps: int, world_size: int) -> int:
    """The state an uninterrupted run reaches."""
    state = 0
    for step in range(1, steps + 1):
        state = (state * 31 + sum((r + 1) * step for r in range(world_size))) % MODULUS
    return state
