"""Rank-0 training metrics: a JSONL file in the run dir, a log line, wandb (offline by
default; a requeued run resumes the same wandb run) and, with logging.tensorboard, TensorBoard
events in RUN_DIR/tensorboard with the same scalars.

metrics.jsonl holds each step once across crashes: a resumed run first drops the
lines past the step it resumed from (the killed run logged them, the resumed one
logs them again), and a line torn by a killed writer is closed off and skipped."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from dtr_scale.config import TrainConfig
from dtr_scale.extras import import_extra
from dtr_scale.io import append_jsonl, read_jsonl, rewrite_jsonl
from dtr_scale.train.progress import loss_text, progress, progress_text, throughput_text
from dtr_scale.train.training_plot import TrainingPlotter, metrics_path
from dtr_scale.wandb_run import open_wandb_run

log = logging.getLogger(__name__)
PHASES = ("data", "forward_backward", "mtl", "optimizer", "checkpoint")  # mtl: ANT-Nash / PCGrad's own work
TENSORBOARD_DIR = "tensorboard"


class StepTimer:
    """Time per phase of the step, summed between log lines (data stalls show up as `data`).

    On CUDA the phase boundaries are CUDA events on the training stream: each phase is the
    device time between its boundaries (a host stall the device waits for lands in the phase
    it stalls), and nothing waits for the device until summary() at a log step. On a CPU they
    are host clock readings."""

    def __init__(self, device: str):
        import torch  # here, not at the top: `dtr-scale status` reads metrics without torch

        self.cuda = torch.device(device).type == "cuda"
        self._event = (lambda: torch.cuda.Event(enable_timing=True)) if self.cuda else None
        self._synchronize = torch.cuda.synchronize if self.cuda else (lambda: None)
        self.marks: list[tuple[str | None, object]] = []  # (phase starting here, clock mark)
        self.steps = 0

    def start(self, phase: str | None) -> None:
        if self.cuda:
            mark = self._event()
            mark.record()
        else:
            mark = time.perf_counter()
        self.marks.append((phase, mark))

    def stop(self) -> None:
        self.start(None)
        self.steps += 1

    def _seconds(self, a: object, b: object) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def summary(self, global_batch: int) -> dict[str, float]:
        """Mean ms per step of each phase and images/s since the last summary (waits for the device)."""
        self._synchronize()
        totals = dict.fromkeys(PHASES, 0.0)
        for (phase, a), (_, b) in zip(self.marks, self.marks[1:]):
            if phase is not None:
                totals[phase] += self._seconds(a, b)
        total = sum(totals.values())
        out = {f"time_{k}_ms": 1e3 * v / max(self.steps, 1) for k, v in totals.items()}
        out["images_per_s"] = global_batch * self.steps / total if total > 0 else 0.0
        self.marks = self.marks[-1:] if self.marks and self.marks[-1][0] is not None else []  # a phase still open
        self.steps = 0
        return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The run's logged records, oldest first; a line cut short by a killed writer is dropped."""
    return read_jsonl(metrics_path(run_dir))


def records_up_to(records: list[dict], step: int) -> list[dict]:
    """The first record of each step up to `step`: what a run resumed at `step` keeps."""
    seen: set[int] = set()
    kept = []
    for record in records:
        if record.get("step", step + 1) <= step and record["step"] not in seen:
            seen.add(record["step"])
            kept.append(record)
    return kept


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
    def __init__(self, run_dir: Path, cfg: TrainConfig, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = metrics_path(run_dir)
        if enabled and self.path.exists():
            records = read_metrics(run_dir)
            kept = records_up_to(records, resume_step)
            if len(kept) != len(records) or self.path.read_bytes()[-1:] not in (b"", b"\n"):
                log.info("%s: dropping %d line(s) past step %d, logged before the crash this run resumes from",
                         self.path, len(records) - len(kept), resume_step)
                rewrite_jsonl(self.path, kept)
        self.total_steps = cfg.steps
        self.step = resume_step  # the wandb step pictures are logged at
        self.plotter = TrainingPlotter(run_dir, self.path) if enabled else None  # redraws training.png
        self.wandb = None
        if enabled and cfg.logging.wandb != "disabled":
            self.wandb = _init_wandb(run_dir, cfg)
        self.tensorboard = None
        if enabled and cfg.logging.tensorboard:
            self.tensorboard = open_tensorboard(Path(run_dir) / TENSORBOARD_DIR, resume_step)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, "time": time.time(), "total_steps": self.total_steps}  # for ETA and percent done
        self.step = record["step"]
        append_jsonl(self.path, record)
        self.plotter.update()
        per_device = throughput_text(record)
        log.info("step %d  %s  grad %.3g  %.1f img/s%s  data %.0f ms  fwd+bwd %.0f ms  opt %.0f ms  %s",
                 record["step"], loss_text(record, "  "), record["grad_norm"], record["images_per_s"],
                 f" ({per_device})" if per_device else "", record["time_data_ms"],
                 record["time_forward_backward_ms"], record["time_optimizer_ms"], progress_text(progress(record)))
        if self.wandb is not None:
            self.wandb.log(flat_scalars(record), step=record["step"])
        if self.tensorboard is not None:
            for name, value in flat_scalars(record).items():
                if name not in ("step", "time") and isinstance(value, (int, float)):  # mfu is None off a known GPU
                    self.tensorboard.add_scalar(name, value, global_step=record["step"])

    def image(self, name: str, path: Path | None) -> None:
        """Log a picture of the run (training.png, routing.png) to wandb, when wandb is on."""
        if self.wandb is not None and path is not None:
            wandb = import_extra("wandb")
            self.wandb.log({name: wandb.Image(str(path))}, step=self.step)

    def close(self) -> None:
        if self.plotter is not None:
            self.image("training", self.plotter.finish(timeout_s=60.0))  # the final curves
            self.plotter = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None


def flat_scalars(record: dict) -> dict:
    """A metrics line with its lists spread out as name/0, name/1, ...: one scalar per name."""
    flat = {k: v for k, v in record.items() if not isinstance(v, list)}
    for name in ("interval_losses", "uw_weights", "nash_alpha"):
        flat.update({f"{name}/{i}": v for i, v in enumerate(record.get(name, []))})
    return flat


def open_tensorboard(directory: Path, resume_step: int = 0):
    """torch's SummaryWriter into `directory` (RUN_DIR/tensorboard, the evaluator's .../eval). A
    resumed run purges the events past its step that the killed run wrote, as metrics.jsonl drops
    their lines."""
    import_extra("tensorboard")  # torch's writer needs the package: missing, an error naming the extra
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(directory), purge_step=resume_step + 1 if resume_step else None)


def _init_wandb(run_dir: Path, cfg: TrainConfig):
    from dtr_scale.train.components import config_to_dict

    return open_wandb_run(run_dir, cfg.logging, run_dir.name, config=config_to_dict(cfg))
