"""Plan a run before submitting it: model cost, throughput and time, SLURM jobs, GPU memory,
storage and evaluation cost, and a ConfigError for settings that cannot work together.

The names below load on first use, so the training loop and `dtr-bench gpu` can import
plan.calibration and plan.model_cost without the launcher's packages (submitit)."""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"Plan": "planner", "make_plan": "planner", "format_plan": "report", "plan_main": "report"}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
