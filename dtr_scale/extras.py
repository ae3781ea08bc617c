"""The optional dependencies (pyproject's extras): imported only where they are used, and
when one is missing, an error that names the extra to install (or the setting that avoids it).

    deepspeed = import_extra("deepspeed")
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> (the extra that installs it, what needs it / how to do without it)
EXTRAS: dict[str, tuple[str, str]] = {
    "deepspeed": ("deepspeed", "backend=deepspeed needs it; backend=ddp or backend=fsdp do not"),
    "wandb": ("wandb", "logging.wandb=offline|online needs it; set logging.wandb=disabled to train without it"),
    "webdataset": ("webdataset", "writing webdataset shards needs it; --format mds (the default) does not"),
    "torch_fidelity": ("eval", "FID / sFID / IS need its Inception network"),
    "diffusers": ("vae", "the SD-VAE autoencoder needs it; --autoencoder pixel does not"),
}


class MissingExtraError(ImportError):
    """An optional dependency that is not installed; the message says which extra installs it."""


def import_extra(module: str) -> ModuleType:
    """`importlib.import_module(module)`, or MissingExtraError naming the extra to install."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != top or top not in EXTRAS:
            raise
        extra, why = EXTRAS[top]
        raise MissingExtraError(f"{top} is not installed ({why}): pip install 'dtr-scale[{extra}]' "
                                f"(or 'dtr-scale[all]')") from err
