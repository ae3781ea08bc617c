"""The optional dependencies (pyproject's extras): imported only where they are used, and
when one is missing, an error that names the extra to install (or the setting that avoids it).

    deepspeed = import_extra("deepspeed")

`missing_extra` asks the same question without importing anything, for the launch checks
that run before a job is submitted (dtr_scale/preflight.py).
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# top-level module -> (the extra that installs it, what needs it / how to do without it)
EXTRAS: dict[str, tuple[str, str]] = {
    "deepspeed": ("deepspeed", "backend=deepspeed needs it; backend=ddp or backend=fsdp do not"),
    "wandb": ("wandb", "logging.wandb=offline|online needs it; set logging.wandb=disabled to train without it"),
    "tensorboard": ("tensorboard", "logging.tensorboard=true needs it; leave logging.tensorboard=false to train without it"),
    "webdataset": ("webdataset", "writing webdataset shards needs it; --format mds (the default) does not"),
    "torch_fidelity": ("eval", "FID / sFID / IS need its Inception network"),
    "diffusers": ("vae", "the SD-VAE autoencoder needs it; --autoencoder pixel does not"),
    "sklearn": ("digits", "the embedded digits (data=digits, `dtr-scale prep digits`) come from scikit-learn; "
                "training on prepared shards does not need it"),
    "cvxpy": ("nash", "weighting=ant_nash solves its bargaining problem with it; the other weightings do not"),
    "ecos": ("nash", "weighting=ant_nash's conic solver; the other weightings do not"),
    "psutil": ("bench", "dtr-bench measures memory with it; training does not"),
}


class MissingExtraError(ImportError):
    """An optional dependency that is not installed; the message says which extra installs it."""


def _missing_message(top: str) -> str:
    extra, why = EXTRAS[top]
    return f"{top} is not installed ({why}): pip install 'dtr-scale[{extra}]' (or 'dtr-scale[all]')"


def missing_extra(module: str) -> str | None:
    """None if `module` can be imported, else the message import_extra would raise; imports nothing."""
    top = module.split(".")[0]
    return None if importlib.util.find_spec(top) is not None else _missing_message(top)


def import_extra(module: str) -> ModuleType:
    """`importlib.import_module(module)`, or MissingExtraError naming the extra to install."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != top or top not in EXTRAS:
            raise
        raise MissingExtraError(_missing_message(top)) from err
