"""The one way this project opens a wandb run: one run per directory, resumed by every process
that logs there (a requeued trainer, each evaluation), its id kept in DIRECTORY/wandb_id.txt."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from dtr_scale.config import LoggingConfig
from dtr_scale.extras import import_extra
from dtr_scale.io import atomic_write_text, temp_path

ID_FILE = "wandb_id.txt"


def wandb_run_id(directory: str | Path) -> str:
    """DIRECTORY's wandb run id, made on first use. Two processes starting at once agree on one:
    the id is written aside and linked into place, which fails for the second (no overwrite)."""
    path = Path(directory) / ID_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_path(path)
        atomic_write_text(tmp, uuid.uuid4().hex[:12])
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def open_wandb_run(directory: str | Path, logging: LoggingConfig, name: str, **init: Any) -> Any:
    """wandb.init for DIRECTORY's run (created or resumed) in logging.wandb's mode; `init` adds
    wandb.init's other arguments (config, job_type, ...)."""
    wandb = import_extra("wandb")
    return wandb.init(project=logging.project, dir=str(directory), id=wandb_run_id(directory), resume="allow",
                      mode=logging.wandb, name=name, **init)
