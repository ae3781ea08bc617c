"""Fixtures for launch tests: the stand-in trainer travels to jobs by value (the SLURM
cluster fixture, `slurm_cluster`, is in tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import cloudpickle

# --import-mode=importlib puts no test folder on sys.path; the launch tests share two helper modules.
sys.path.insert(0, str(Path(__file__).parent))
import stand_in_trainer  # noqa: E402

# Jobs unpickle the trainer in a fresh interpreter where tests/launch is not importable.
cloudpickle.register_pickle_by_value(stand_in_trainer)
