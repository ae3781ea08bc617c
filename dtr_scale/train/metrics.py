"""Rank-0 training metrics: a JSONL file in the run dir, a log line, and wandb
(offline by default; a requeued run resumes the same wandb run)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

import torch

from dtr_scale.config import TrainConfig
from dtr_scale.train.components import config_to_dict

log = logging.getLogger(__name__)
PHASES = ("data", "forward_backward", "optimizer", "checkpoint")


class StepTimer:
    """Wall time per phase of the step, summed between log lines (data stalls show up as `data`)."""

    def __init__(self, device: str):
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self.phase: str | None = None
        self.since = 0.0

    def start(self, phase: str) -> None:
        now = self._now()
        if self.phase is not None:
            self.totals[self.phase] += now - self.since
        self.phase, self.since = phase, now

    def stop(self) -> None:
        self.start(None)  # type: ignore[arg-type]
        self.steps += 1

    def _now(self) -> float:
        self.sync()
        return time.perf_counter()

    def summary(self, global_batch: int) -> dict[str, float]:
        total = sum(self.totals.values())
        out = {f"time_{k}_ms": 1e3 * v / max(self.steps, 1) for k, v in self.totals.items()}
        out["images_per_s"] = global_batch * self.steps / total if total > 0 else 0.0
        self.totals = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        return out


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The run's logged records, oldest first; a line cut short by a killed writer is dropped."""
    path = metrics_path(run_dir)
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def last_logged(run_dir: str | Path, tail_bytes: int = 65536) -> dict | None:
    """The newest complete record, read from the file's end (a long run's log is not re-read)."""
    path = metrics_path(run_dir)
    if not path.exists():
        return None
    with open(path, "rb") as f:
        f.seek(max(f.seek(0, 2) - tail_bytes, 0))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue  # cut short by a killed writer, or by where the tail began
    return None


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: TrainConfig, enabled: bool):
        self.enabled = enabled
        self.path = metrics_path(run_dir)
        self.wandb = None
        if enabled and cfg.logging.wandb != "disabled":
            self.wandb = _init_wandb(run_dir, cfg)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        log.info("step %d  loss %.4f  grad %.3g  %.1f img/s  data %.0f ms  fwd+bwd %.0f ms  opt %.0f ms",
                 record["step"], record["loss"], record["grad_norm"], record["images_per_s"],
                 record["time_data_ms"], record["time_forward_backward_ms"], record["time_optimizer_ms"])
        if self.wandb is not None:
            flat = {k: v for k, v in record.items() if not isinstance(v, list)}
            for name in ("interval_losses", "uw_weights"):
                flat.update({f"{name}/{i}": v for i, v in enumerate(record.get(name, []))})
            self.wandb.log(flat, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _init_wandb(run_dir: Path, cfg: TrainConfig):
    import wandb

    id_file = run_dir / "wandb_id.txt"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])  # one wandb run per run dir, across requeues
    return wandb.init(project=cfg.logging.project, dir=str(run_dir), id=id_file.read_text().strip(),
                      resume="allow", mode=cfg.logging.wandb, config=config_to_dict(cfg), name=run_dir.name)
