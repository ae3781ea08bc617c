"""DeepSpeed ZeRO stage 1, 2 or 3 behind the trainer's backend interface.

The DeepSpeed JSON is generated from the config (`deepspeed_config`), with
`backend.deepspeed_overrides` deep-merged on top, and written to the run dir.

Choices, and why:

- The optimizer is the project's torch AdamW (`build_optimizer`: "model" and
  "uw" groups), wrapped by ZeRO, so a step is the same arithmetic as on one
  process and checkpoints hold the same exp_avg / exp_avg_sq.
- bf16 is DeepSpeed's `torch_autocast` (fp32 weights, bf16 autocast forward,
  fp32 gradient reduction), not its `bf16` section (bf16 weights): the numbers
  of the DDP/FSDP backends, and the diffusion forward process and the ANT-UW
  loss stay in fp32.
- Gradient accumulation: `gradient_accumulation_steps` is in the JSON;
  `micro_step(last)` tells the engine where the boundary is, so gradients are
  reduced after the last micro-batch, the loop reads the norm, then calls
  step() once. The loop already divides each micro-batch loss by grad_accum,
  so `backward` does not let the engine divide again.
- Clipping is DeepSpeed's ("gradient_clipping", the same formula as torch's
  clip_grad_norm_); `clip_grad_norm` returns the global norm before clipping,
  computed by the ZeRO optimizer from its reduced gradient partitions.
- Skipping a step goes through ZeRO's own overflow path (no update, no AdamW
  step count, gradients freed), which it takes when the gradient norm is not
  finite; a finite-gradient skip first sets one gradient to NaN.
- EMA: a full fp32 copy on every rank. Under ZeRO-3 each update gathers the
  model's parameters once (one more all-gather per step, and a transient full
  fp32 copy), and the EMA itself costs 4 bytes/param per rank that ZeRO-3
  otherwise spreads out (DiT-XL/2: 2.7 GB each), in exchange for an EMA that is
  plain, rank-identical and readable without DeepSpeed.

Checkpoints (directory `path`):

    zero/            engine.save_checkpoint: every rank writes its own ZeRO shard
    ema.safetensors  the EMA, official DiT names (what the evaluator reads)
    extra_state.pt   the extra stateful objects registered with the checkpoint manager (post-hoc EMA), rank 0
    deepspeed.json   world size, ZeRO stage and optimizer groups at save time

Loading on the same world size uses the shards directly (ZeRO-1 and ZeRO-2
shards load into each other). On another world size they are first converted,
once, into a DeepSpeed universal checkpoint under `path/universal/`
(`ds_to_universal`, by rank 0), which is loaded with `load_universal`: fp32
weights, UW log-variances and both AdamW moments are resharded exactly, so the
trajectory carries on. ZeRO-3 and ZeRO-1/2 checkpoints do not convert into
each other (DeepSpeed's universal form does not bridge their file layouts).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import shutil
import threading
from argparse import Namespace
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from dtr_scale.config import ConfigError, TrainConfig
from dtr_scale.extras import import_extra
from dtr_scale.train.components import build_optimizer
from dtr_scale.train.manifest import CheckpointError
from dtr_scale.train.ema import ema_pairs, update_ema
from dtr_scale.train.speed import apply_speed_switches
from dtr_scale.world import World, join_process_group

if TYPE_CHECKING:
    from dtr_scale.train.components import DiffusionTrainModule

log = logging.getLogger(__name__)

TAG = "zero"  # the engine's checkpoint tag: its shards live in path/zero/
EMA_EXPORT = "ema.safetensors"  # the EMA in official DiT names: what the evaluator reads without DeepSpeed
UNIVERSAL = "universal"
EXTRA_FILE = "extra_state.pt"
META_FILE = "deepspeed.json"


class DeepSpeedCheckpointError(RuntimeError):
    """A checkpoint directory this backend cannot resume from; the message says why."""


def deep_merge(base: dict, override: dict) -> dict:
    """`base` with `override` merged in: nested dicts merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed JSON for this run: generated from cfg, then backend.deepspeed_overrides on top."""
    b = cfg.backend
    generated = {
        "train_batch_size": cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": b.grad_accum,
        "gradient_clipping": float(cfg.optimizer.grad_clip or 0.0),
        "zero_optimization": {"stage": b.zero_stage},
        # autocast with fp32 weights; an empty safe-module list keeps gradient reduction in fp32
        "torch_autocast": {"enabled": b.precision == "bf16", "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,  # torch AdamW
        "steps_per_print": 2**31 - 1,  # the loop logs
        "wall_clock_breakdown": False,
    }
    merged = deep_merge(generated, dict(b.deepspeed_overrides))
    if merged["bf16"].get("enabled") or merged["fp16"].get("enabled"):
        raise ConfigError("backend.deepspeed_overrides: DeepSpeed's bf16/fp16 sections cast the weights, which this "
                          "trainer does not support; set backend.precision=bf16 (torch autocast, fp32 weights) instead")
    if merged["gradient_clipping"] != generated["gradient_clipping"]:
        raise ConfigError("backend.deepspeed_overrides: gradient_clipping is optimizer.grad_clip (every backend "
                          "clips to it); set optimizer.grad_clip instead")
    return merged


_NO_INTERVAL_GRADIENTS = ("ZeRO keeps the gradients inside its optimizer, so weighting=ant_nash and pcgrad (the k "
                          "per-interval gradients) run on backend=ddp or backend=fsdp (the config refuses this pairing)")


class DeepSpeedBackend:
    def __init__(self, cfg: TrainConfig, world: World):
        self.cfg = cfg
        self.world = world
        self.stage = cfg.backend.zero_stage
        self.config = deepspeed_config(cfg)
        self._grad_norm: float | None = None  # this step's, once clip_grad_norm has measured it

    # setup -------------------------------------------------------------------

    def setup(self, module: DiffusionTrainModule, ema: nn.Module) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if self.cfg.device == "cuda" else "cpu")
        deepspeed = import_extra("deepspeed")

        if not dist.is_initialized():
            # one process: DeepSpeed still wants a group, and keeps using the first one it adopted, so
            # it stays for the life of the process (a later run in this process finds it)
            join_process_group(self.world, self.cfg.device)
        deepspeed.init_distributed(dist_backend="nccl" if self.cfg.device == "cuda" else "gloo")  # adopts the group
        apply_speed_switches(module.model, self.cfg.backend)
        optimizer = build_optimizer(module.model, module.objective, self.cfg)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=self.config)
        self.module, self.ema = module, ema.to(self.engine.device)
        self._ema_pairs = ema_pairs(self.ema, module.model)
        if self.world.rank == 0:
            run_dir = Path(self.cfg.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "deepspeed_config.json").write_text(json.dumps(self.config, indent=1))

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    # step --------------------------------------------------------------------

    def forward(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.engine(*(x.to(self.engine.device) for x in inputs))

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        """ZeRO reduces (stage 1) or finishes reducing (2, 3) the gradients on the last micro-batch."""
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop has divided by grad_accum

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm. DeepSpeed clips inside step() to the JSON's gradient_clipping,
        which is optimizer.grad_clip, the loop's max_norm (0 there is inf here: no clipping)."""
        from deepspeed.runtime.utils import combine_grad_norm_groups

        # what the ZeRO optimizer computes in step(), one scalar all-reduce; non-finite -> inf
        opt = self.engine.optimizer
        norm = combine_grad_norm_groups(opt._get_norm_groups()) if self.stage == 3 else opt.scaled_global_norm()
        norm = torch.as_tensor(norm, dtype=torch.float32).detach().cpu()
        self._grad_norm = norm.item()
        return norm

    def step(self, apply: torch.Tensor | None = None) -> None:
        if apply is not None and not bool(apply):  # read on the host: ZeRO skips through its own path
            return self.skip()
        self.engine.step()
        self._grad_norm = None

    def skip(self) -> None:
        """Drop this step's gradients through ZeRO's own overflow path (no update, no AdamW step count)."""
        from deepspeed.utils import safe_set_full_grad

        if self._grad_norm is None or math.isfinite(self._grad_norm):
            # ZeRO discards a step only when its gradient norm is not finite: make it so
            first = next(self.module.parameters())
            safe_set_full_grad(first, torch.full(_full_shape(first), math.nan, device=self.engine.device))
        self.engine.step()
        self._grad_norm = None

    @property
    def grads_sharded(self) -> bool:
        return self.stage >= 2

    def take_local_grads(self) -> list[torch.Tensor]:
        raise NotImplementedError(_NO_INTERVAL_GRADIENTS)

    def set_local_grads(self, grads: list[torch.Tensor]) -> None:
        raise NotImplementedError(_NO_INTERVAL_GRADIENTS)

    def update_ema(self, decay: float) -> None:
        with self._gathered(self.module.model):
            update_ema(self._ema_pairs, decay)

    # state -------------------------------------------------------------------

    def _gathered(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Full parameters of `model` inside the context (collective under ZeRO-3, read-only)."""
        if self.stage < 3:
            return contextlib.nullcontext()
        deepspeed = import_extra("deepspeed")

        return deepspeed.zero.GatheredParameters(list(model.parameters()))

    def full_state(self, which: str) -> dict[str, torch.Tensor] | None:
        if which not in ("ema", "model"):
            raise ValueError(f"full_state: which must be 'ema' or 'model', got {which!r}")
        source = self.ema if which == "ema" else self.module.model
        with self._gathered(source) if which == "model" else contextlib.nullcontext():
            if self.world.rank != 0:
                return None
            return {k: v.detach().cpu().clone() for k, v in source.state_dict().items()}

    def save(self, path: Path, *, extra: Mapping[str, Stateful] = {}, asynchronous: bool = False) -> None:
        """Write the state under directory `path` (collective, synchronous: returns None)."""
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )
        from safetensors.torch import save_file

        path = Path(path)
        # the universal-checkpoint info lets ds_to_universal convert these shards for another world size
        universal_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        self.engine.save_checkpoint(str(path), tag=TAG, client_state={UNIVERSAL_CHECKPOINT_INFO: universal_info},
                                    save_latest=False)
        if self.world.rank == 0:
            ema = {k: v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()}
            save_file(ema, str(path / EMA_EXPORT))
            torch.save({name: obj.state_dict() for name, obj in extra.items()}, path / EXTRA_FILE)
            groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
            meta = {"world_size": self.world.size, "zero_stage": self.stage, "tag": TAG, "param_groups": groups}
            (path / META_FILE).write_text(json.dumps(meta, indent=1))
        return None

    def load(self, path: Path, *, extra: Mapping[str, Stateful] = {}) -> None:
        path = Path(path)
        if not (path / META_FILE).exists():
            raise DeepSpeedCheckpointError(f"{path} has no {META_FILE}: it was not written by the DeepSpeed backend; "
                                           "resume it with the backend named in its meta.json")
        meta = json.loads((path / META_FILE).read_text())
        with deepspeed_files_read_safely():
            self._load(path, meta, extra)

    def _load(self, path: Path, meta: dict[str, Any], extra: Mapping[str, Stateful]) -> None:
        from safetensors.torch import load_file

        universal = needs_universal(meta, self.world.size, self.stage)
        load_dir = path
        if universal:
            load_dir = path / UNIVERSAL
            if self.world.rank == 0:
                _convert_to_universal(path / meta["tag"], load_dir / meta["tag"])
            dist.barrier()
            log.info("resuming a ZeRO-%d checkpoint of %d rank(s) on ZeRO-%d x %d through its universal form %s",
                     meta["zero_stage"], meta["world_size"], self.stage, self.world.size, load_dir)
        with universal_load(self.engine, universal):
            loaded, _ = self.engine.load_checkpoint(str(load_dir), tag=meta["tag"], load_module_strict=True,
                                                    load_lr_scheduler_states=False)
        if loaded is None:
            raise DeepSpeedCheckpointError(f"DeepSpeed found no checkpoint under {load_dir / meta['tag']}")
        # a universal load gives every group the first group's hyperparameters (and name), and under
        # ZeRO-3 one shared `step` tensor that AdamW would then advance once per group: undo both
        for group, saved in zip(self.param_groups, meta["param_groups"]):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        for state in self.optimizer.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        self.ema.load_state_dict(load_file(str(path / EMA_EXPORT), device=str(self.engine.device)))
        saved = load_extra_state(path / EXTRA_FILE)
        for name, obj in extra.items():
            if name not in saved:
                raise DeepSpeedCheckpointError(f"{path / EXTRA_FILE} has no {name!r} state (it has {sorted(saved)}); "
                                               f"the run that wrote it did not track it")
            obj.load_state_dict(saved[name])

    @staticmethod
    def wrote(path: Path) -> bool:
        """Whether checkpoint directory `path` was written by this backend."""
        return (path / META_FILE).exists()

    @staticmethod
    def read_weights(path: Path, which: str) -> dict[str, torch.Tensor]:
        """The EMA from its safetensors export; the raw weights live only in ZeRO's shards."""
        if which != "ema":
            raise CheckpointError(f"could not read the model weights of {path}: a DeepSpeed checkpoint holds them "
                                  f"only in ZeRO's shards; evaluate its EMA ({EMA_EXPORT}) instead")
        from safetensors.torch import load_file

        return load_file(str(path / EMA_EXPORT))


def deepspeed_checkpoint_classes() -> list[type]:
    """The only classes a DeepSpeed checkpoint of this project pickles besides plain data and tensors."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


@contextlib.contextmanager
def universal_load(engine: Any, universal: bool) -> Iterator[None]:
    """Whether `engine` loads a universal checkpoint, for one load: DeepSpeed asks its
    load_universal_checkpoint() (the JSON's checkpoint.load_universal, fixed at initialize), and
    whether a load is universal is only known when the checkpoint is chosen. Shadowed on this
    engine alone, and removed again."""
    engine.load_universal_checkpoint = lambda: universal
    try:
        yield
    finally:
        del engine.load_universal_checkpoint


_safe_loads = threading.local()  # .depth: how many deepspeed_files_read_safely scopes this thread is in
_switch = threading.Lock()
_switched = {"scopes": 0, "real": None}  # scopes open in all threads; torch.load as it was before the first


def _load_weights_only(f: Any, *args: Any, **kwargs: Any) -> Any:
    kwargs["weights_only"] = True
    try:
        return _switched["real"](f, *args, **kwargs)
    except pickle.UnpicklingError as err:
        found = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "")
        raise DeepSpeedCheckpointError(
            f"refusing to load {f}: it holds objects that a DeepSpeed checkpoint written by dtr-scale never "
            f"does ({found or 'not plain data'}), so loading it could run code; delete this checkpoint to "
            f"resume from the one before") from None


def _torch_load(f: Any, *args: Any, **kwargs: Any) -> Any:
    """torch.load while a scope is open somewhere: weights-only in a thread inside a scope, and
    exactly torch.load in every other thread."""
    if getattr(_safe_loads, "depth", 0):
        return _load_weights_only(f, *args, **kwargs)
    return _switched["real"](f, *args, **kwargs)


@contextlib.contextmanager
def deepspeed_files_read_safely() -> Iterator[None]:
    """DeepSpeed reads its shard files with torch.load(weights_only=False), which runs whatever a
    crafted file holds, and offers no hook for its universal-checkpoint reads. Inside this
    context, in this thread, every torch.load is weights_only=True with DeepSpeed's own
    checkpoint classes allowed, and a file that needs anything else is refused by name. Other
    threads' torch.load calls behave as before; the original torch.load is back once the last
    scope closes. (torch keeps one allow-list: while a scope is open, other threads' weights-only
    loads also accept DeepSpeed's few plain checkpoint classes.)"""
    with _switch:
        if _switched["scopes"] == 0:
            _switched["real"] = torch.load
            torch.load = _torch_load
        _switched["scopes"] += 1
    _safe_loads.depth = getattr(_safe_loads, "depth", 0) + 1
    try:
        with torch.serialization.safe_globals(deepspeed_checkpoint_classes()):
            yield
    finally:
        _safe_loads.depth -= 1
        with _switch:
            _switched["scopes"] -= 1
            if _switched["scopes"] == 0:
                torch.load = _switched["real"]


def load_extra_state(path: Path) -> dict[str, Any]:
    """The extra state (tensors, lists, numbers) with weights_only=True: no code runs from the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise DeepSpeedCheckpointError(
            f"refusing to load {path}: it holds more than tensors and plain values ({err}), which a checkpoint "
            f"written by dtr-scale never does (a crafted or foreign file); delete this checkpoint to resume from "
            f"the one before") from err


def needs_universal(saved: dict, world_size: int, zero_stage: int) -> bool:
    """Whether a checkpoint (its deepspeed.json) must go through the universal form to load here.

    ZeRO-1 and ZeRO-2 shards share a format; ZeRO-3's differs, and DeepSpeed's universal
    form does not bridge the two, so a stage-3 run resumes only from stage-3 checkpoints.
    """
    if (saved["zero_stage"] == 3) != (zero_stage == 3):
        raise DeepSpeedCheckpointError(
            f"the checkpoint was written by ZeRO-{saved['zero_stage']} and this run uses ZeRO-{zero_stage}; "
            f"ZeRO-3 and ZeRO-1/2 checkpoints do not convert into each other: resume with "
            f"backend.zero_stage={saved['zero_stage']} (on any number of processes)")
    return saved["world_size"] != world_size


def _full_shape(param: nn.Parameter) -> torch.Size:
    return getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps the full shape aside


def _convert_to_universal(shards: Path, out: Path) -> None:
    """ds_to_universal, once: written to a temporary name and renamed, so a crash leaves no half conversion."""
    if out.exists():
        return
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # an earlier, interrupted conversion
    args = Namespace(input_folder=str(shards), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=False)
    ds_to_universal(args)
    os.replace(tmp, out)
