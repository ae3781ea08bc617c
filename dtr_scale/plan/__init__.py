"""Plan a run before submitting it: model cost, throughput and time, SLURM jobs, GPU memory,
storage and evaluation cost, and a ConfigError for settings that cannot work together."""

from dtr_scale.plan.planner import Plan, make_plan
from dtr_scale.plan.report import format_plan, plan_main

__all__ = ["Plan", "format_plan", "make_plan", "plan_main"]
