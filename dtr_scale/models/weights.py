"""Reading a weights file a user hands the project, without running code from it.

Every weights file (a released DiT `.pt`, an exported `.safetensors`, the FID Inception
`.pth`) is read either as safetensors or with `torch.load(weights_only=True)`, whose
unpickler rebuilds tensors and plain containers only. A file that needs arbitrary
unpickling (an old pickle of a whole model, or a crafted one) is refused with a message
saying how to convert it once, by someone who trusts its source.

A DiT weights file is one of:
    a state dict with the official DiT names           (DiT-XL-2-256x256.pt, `dtr-scale export`)
    a DiT training checkpoint {"model", "ema", "opt", "args"}   (its "ema" is used)
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]
# DiT's train.py saves its argparse.Namespace in each checkpoint; the weights-only unpickler
# can rebuild it (attributes only, no code), so such checkpoints load without a conversion.
SAFE_GLOBALS = [argparse.Namespace]


class WeightsFileError(ValueError):
    """A weights file that cannot be read or does not fit the model; the message says what to do."""


class UnsafeWeightsError(WeightsFileError):
    """A weights file that only an unrestricted unpickler (one that runs code from the file) can read."""


def conversion_hint(path: Path) -> str:
    return (f"If you trust where {path} comes from, convert it once to a file of plain tensors:\n"
            f"  python -c \"import torch; from safetensors.torch import save_file; "
            f"sd = torch.load('{path}', weights_only=False); sd = sd.state_dict() if hasattr(sd, 'state_dict') else sd; "
            f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{path.with_suffix('.safetensors')}')\"\n"
            f"and pass the .safetensors file instead.")


def load_weights_file(path: str | Path, *, what: str = "weights") -> object:
    """The contents of a `.safetensors` or torch-saved file, read without executing code from it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise WeightsFileError(f"{what} file {path} is not a readable safetensors file ({err}); "
                                   "re-download or re-export it") from err
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Only a pickled class or function ("Unsupported global") needs the unrestricted unpickler; any
        # other refusal (a web page saved as .pt, garbage bytes: "Unsupported operand") is no weights file.
        if "unsupported global" not in str(err).lower():
            raise WeightsFileError(f"{what} file {path} is not a readable torch or safetensors file ({err}); "
                                   "re-download it") from err
        raise UnsafeWeightsError(f"{what} file {path} is refused: reading it needs an unpickler that can run code "
                                 f"from the file, and weights are loaded with weights_only=True only.\n"
                                 f"{conversion_hint(path)}") from err
    except Exception as err:  # a truncated or foreign file fails anywhere inside the unpickler
        raise WeightsFileError(f"{what} file {path} is not a readable torch or safetensors file "
                               f"({type(err).__name__}: {err}); re-download it") from err


def load_state_dict_file(path: str | Path, *, what: str = "weights") -> StateDict:
    """A flat {name: tensor} from a weights file (see load_weights_file)."""
    contents = load_weights_file(path, what=what)
    if not isinstance(contents, Mapping) or not all(isinstance(v, torch.Tensor) for v in contents.values()):
        raise WeightsFileError(f"{what} file {path} does not hold a state dict ({{name: tensor}}); "
                               f"found {type(contents).__name__}")
    return dict(contents)


def dit_state_dict(path: str | Path) -> StateDict:
    """The DiT weights in `path`: a state dict with the official names, or the "ema" weights of
    a DiT training checkpoint."""
    contents = load_weights_file(path, what="DiT weights")
    if isinstance(contents, Mapping) and isinstance(contents.get("ema"), Mapping):
        contents = contents["ema"]
    if not isinstance(contents, Mapping) or not all(isinstance(v, torch.Tensor) for v in contents.values()):
        raise WeightsFileError(f"DiT weights file {path} holds neither a state dict nor a DiT training checkpoint "
                               f"with an 'ema' entry; found {type(contents).__name__}")
    return dict(contents)


def load_dit_weights(model: nn.Module, path: str | Path, state: StateDict | None = None) -> nn.Module:
    """Load `path` into `model` strictly: every official name present, nothing else, same shapes.
    The routing tables are not in the state dict (the config rebuilds them), so one file fits a
    vanilla and a routed model alike. `state`: dit_state_dict(path), where the caller read it already."""
    state = dit_state_dict(path) if state is None else state
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong_shape = sorted(name for name in set(state) & set(own) if state[name].shape != own[name].shape)
    if missing or unexpected or wrong_shape:
        shapes = "; ".join(f"{n}: {tuple(state[n].shape)} in the file, {tuple(own[n].shape)} in the model"
                           for n in wrong_shape[:3])
        raise WeightsFileError(f"DiT weights file {path} does not fit the configured model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}{'; ' + shapes if shapes else ''}. Name the model the "
                               f"weights belong to (e.g. model=dit_xl2 model.input_size=32 for DiT-XL-2-256x256.pt)")
    model.load_state_dict(state)
    return model
