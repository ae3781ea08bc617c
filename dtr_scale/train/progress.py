"""How far a run is, when it will end and the losses people read, from its logged metrics
records alone (no torch: `dtr-scale status`, the log lines and the job's progress bar use it).

A record logs `images_per_s` over its log interval and `images_seen` so far, so the measured
step rate is images_per_s / (images_seen / step); `total_steps` and `time` (Unix seconds)
are written with every record.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any


def steps_per_second(record: dict[str, Any]) -> float | None:
    """The step rate measured over the record's log interval (None if it cannot be told)."""
    step, seen, rate = record.get("step"), record.get("images_seen"), record.get("images_per_s")
    if not step or not seen or not rate:
        return None
    return rate / (seen / step)  # images/s over images per step


def eta_seconds(step: int, total_steps: int, rate: float | None) -> float | None:
    """Seconds until step `total_steps` at `rate` steps/s (0 once there)."""
    if step >= total_steps:
        return 0.0
    return (total_steps - step) / rate if rate else None


def format_duration(seconds: float) -> str:
    """H:MM:SS, with days in front past 24 hours ("2d 03:04:05")."""
    seconds = int(math.ceil(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {hours:02d}:{rest // 60:02d}:{rest % 60:02d}" if days else text


def format_clock(unix_s: float) -> str:
    return datetime.fromtimestamp(unix_s, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def progress(record: dict[str, Any], now: float | None = None) -> dict[str, Any] | None:
    """Percent done, step rate and time left as of `now` (default: the record's own time), from
    one metrics record; None when the record does not say how many steps the run has."""
    total = record.get("total_steps")
    if not total:
        return None
    step = int(record["step"])
    rate = steps_per_second(record)
    eta = eta_seconds(step, total, rate)
    logged = record.get("time")
    finish = logged + eta if eta is not None and logged is not None else None
    if finish is not None and now is not None:
        eta = max(0.0, finish - now)  # the rate measured at the record, counted from now
    return {"step": step, "total_steps": total, "percent": 100.0 * step / total, "steps_per_s": rate,
            "images_per_s": record.get("images_per_s"), "eta_s": eta, "finish_time": finish}


def progress_text(info: dict[str, Any]) -> str:
    """ "37.5% of 1200 steps, ETA 0:04:12" (ETA unknown until a rate is measured)."""
    text = f"{info['percent']:.1f}% of {info['total_steps']} steps"
    if info["eta_s"] is not None:
        text += f", ETA {format_duration(info['eta_s'])}"
    return text


def throughput_text(record: dict[str, Any]) -> str:
    """ "412.0 images/s per device, MFU 41.3%" from a metrics record ("" for a record from before
    these were logged; MFU only on a GPU with a known peak)."""
    per_device = record.get("images_per_s_per_device")
    if per_device is None:
        return ""
    mfu = record.get("mfu")
    return f"{per_device:.1f} images/s per device" + (f", MFU {100 * mfu:.1f}%" if mfu is not None else "")


def loss_fields(record: dict[str, Any]) -> dict[str, str]:
    """The losses a person reads, formatted: `mse`, the unweighted mean MSE (the number comparable
    across runs and weightings), then `objective`, what the optimizer minimises (under ANT-UW the
    uncertainty-weighted sum, which turns negative as the learned log-variances grow)."""
    fields = {"mse": f"{record['mse']:.4f}"} if record.get("mse") is not None else {}
    return {**fields, "objective": f"{record['loss']:.4f}"}


def loss_text(record: dict[str, Any], sep: str = ", ") -> str:
    """ "mse 0.1234, objective -20.1500" from a metrics record (no mse in a record that lacks one)."""
    return sep.join(f"{name} {value}" for name, value in loss_fields(record).items())
