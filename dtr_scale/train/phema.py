"""Checkpoint averaging: EDM2 post-hoc EMA and plain window averaging (SPEC section 6).

A power-function EMA with exponent gamma, read at training step t, weighs the
parameters of step tau <= t by p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)
(Karras et al. 2024, "EDM2", sec. 3.1). Its relative standard deviation
sigma_rel (the width of that profile as a fraction of t) is the knob people
tune. The trainer tracks a couple of such EMAs and saves snapshots of them; the
evaluator finds the linear combination of snapshot profiles closest (in L2) to
the profile of any target sigma_rel and applies those coefficients to the
snapshots' weights (EDM2 sec. 3 and its post-hoc EMA appendix).

Time is measured in optimizer steps: `PowerFunctionEMA.update(step)` is called
after optimizer step `step` (1, 2, ...), and a snapshot saved then has t = step.

Snapshots: RUN_DIR/phema/phema-00050000-0.050.safetensors (step, sigma_rel; both
exact in the file's metadata), full tensors written by rank 0, each atomically and
durably. A snapshot due at a checkpoint's step is written before that checkpoint
commits, so every snapshot due up to the checkpoint a run resumes from exists: a
crash can lose only snapshots past it, and the resumed run writes those again.
`snapshot_inventory` lists the expected and present snapshots, for an evaluator
that must refuse a reconstruction from an incomplete grid; `read_snapshots` is how
the evaluator reads them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from dtr_scale.config import TrainConfig
from dtr_scale.io import atomic_write_bytes, disk_full_error, is_disk_full, require_free_space
from dtr_scale.world import World, full_tensor

StateDict = dict[str, torch.Tensor]
MAX_STD = 12**-0.5  # sigma_rel at gamma = 0 (a uniform average over [0, t])
SNAPSHOT_GLOB = "phema-*.safetensors"  # snapshot_name's files; a writer's tmp file starts with "."
# A snapshot is written before its step's checkpoint: a run stopped here resumes from the checkpoint before.
SNAPSHOT_ADVICE = ("Free space there (or move the run to a larger filesystem); each snapshot step keeps one "
                   "model-sized file per phema_stds entry for good (fewer phema_stds or a larger phema_every need less). "
                   "The snapshots already written and the latest complete checkpoint are untouched, and the run "
                   "resumes from that checkpoint.")


def exp_to_std(gamma: float | np.ndarray) -> np.ndarray:
    # EDM2 sec. 3.1: sigma_rel of the profile (gamma+1) u^gamma on u in [0, 1]
    gamma = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_to_exp(std: float | np.ndarray) -> np.ndarray:
    # EDM2 sec. 3.1 inverted: largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0
    std = np.asarray(std, dtype=np.float64)
    gammas = []
    for s in std.reshape(-1):
        roots = np.roots([1.0, 7.0, 16.0 - s**-2, 12.0 - s**-2]) if s > 0 else np.array([])
        real = roots[np.abs(roots.imag) < 1e-9].real
        if real.size == 0 or real.max() < -1e-9:
            raise ValueError(f"sigma_rel={s} is outside (0, {MAX_STD:.4f}], the range of power-function EMAs "
                             "with gamma >= 0; choose a sigma_rel in that range")
        gammas.append(max(real.max(), 0.0))
    return np.asarray(gammas, dtype=np.float64).reshape(std.shape)


def power_function_beta(step: int, gamma: float) -> float:
    # EDM2 sec. 3.1, one step per update: beta_t = (1 - 1/t)^(gamma + 1)
    return float((1.0 - 1.0 / step) ** (gamma + 1.0))


def power_function_inner_product(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    # EDM2 post-hoc EMA appendix: int_0^min(t_a,t_b) p_a p_b = (g_a+1)(g_b+1) / ((g_a+g_b+1) t_max) * (t_a/t_b)^(g_b if t_a<t_b else -g_a)
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    ratio_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    numerator = (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** ratio_exp
    return numerator / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def solve_posthoc_coefficients(snapshots: Sequence[tuple[float, float]], target: tuple[float, float]) -> np.ndarray:
    """Weights x (one per snapshot (t_i, gamma_i)) with sum_i x_i p_i ~= p_target in L2, divided by
    their sum as EDM2's `solve_posthoc_coefficients` does (X = X / X.sum(0)): the normal equations
    A x = b of the profiles' inner products (EDM2 post-hoc EMA appendix). The division makes the
    weights sum to 1, so averaging identical snapshots returns them unchanged."""
    if len(snapshots) == 0:
        raise ValueError("post-hoc EMA needs at least one snapshot")
    steps, gammas = (np.asarray(column, dtype=np.float64) for column in zip(*snapshots))
    if np.any(steps <= 0):
        raise ValueError(f"snapshot steps must be >= 1, got {steps.min()}")
    gram = power_function_inner_product(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    rhs = power_function_inner_product(steps, gammas, float(target[0]), float(target[1]))
    # lstsq rather than solve: duplicated snapshots make the Gram matrix singular
    coefficients = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    return coefficients / coefficients.sum()


def weighted_state_dict(state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> StateDict:
    """sum_i w_i sd_i for floating tensors (accumulated in float64, cast back); other
    entries (integer buffers such as BatchNorm counters) are taken from the last one."""
    if len(state_dicts) == 0 or len(state_dicts) != len(weights):
        raise ValueError(f"need one weight per state dict, got {len(weights)} weights for {len(state_dicts)} state dicts")
    keys = list(state_dicts[-1].keys())
    for i, sd in enumerate(state_dicts):
        if set(sd.keys()) != set(keys):
            missing, extra = sorted(set(keys) - set(sd.keys())), sorted(set(sd.keys()) - set(keys))
            raise KeyError(f"state dict {i} does not match the others: missing {missing[:5]}, unexpected {extra[:5]}; "
                           "average only checkpoints of the same model")
    out: StateDict = {}
    for key in keys:
        last = state_dicts[-1][key]
        if not last.is_floating_point():
            out[key] = last.detach().clone()
            continue
        total = torch.zeros(last.shape, dtype=torch.float64, device=last.device)
        for w, sd in zip(weights, state_dicts):
            total += float(w) * sd[key].detach().to(device=last.device, dtype=torch.float64)
        out[key] = total.to(last.dtype)
    return out


def average_state_dicts(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Uniform average of a window of checkpoints (plain checkpoint averaging)."""
    return weighted_state_dict(state_dicts, [1.0 / len(state_dicts)] * len(state_dicts))


def reconstruct(snapshots: Sequence[tuple[int, float, Mapping[str, torch.Tensor]]], target_std: float, at_step: int) -> StateDict:
    """Post-hoc EMA: the weights of a power-function EMA with sigma_rel = target_std at
    step at_step, from snapshots (step, gamma, state_dict) saved by PowerFunctionEMA
    (gamma = std_to_exp(std) of the tracked EMA)."""
    coefficients = solve_posthoc_coefficients([(step, gamma) for step, gamma, _ in snapshots],
                                              (at_step, float(std_to_exp(target_std))))
    return weighted_state_dict([sd for _, _, sd in snapshots], coefficients.tolist())


class PowerFunctionEMA:
    """Power-function EMAs of `model`'s state, one per sigma_rel in `stds` (EDM2 sec. 3.1).
    Pass the unwrapped module (not DDP/FSDP); call update(step) after each optimizer step."""

    def __init__(self, model: nn.Module, stds: Sequence[float] = (0.05, 0.10)) -> None:
        self.model = model
        self.stds = tuple(float(s) for s in stds)
        self.gammas = tuple(float(g) for g in std_to_exp(np.asarray(self.stds)))
        self.emas: list[StateDict] = [
            {k: v.detach().clone() for k, v in model.state_dict().items()} for _ in self.stds
        ]
        # Only the parameters move: buffers are fixed tables (the positional embedding, the routing
        # masks), kept as cloned. The lists are taken once (a state_dict() per step costs a small
        # model as much as the lerps) and grouped by tensor type: under FSDP2 the parameters are
        # DTensor shards, which foreach ops do not mix with plain tensors.
        groups: dict[type, list[str]] = {}
        for name, param in model.named_parameters():
            if param.is_floating_point():
                groups.setdefault(type(param.data), []).append(name)
        params = dict(model.named_parameters())
        self._sources = [[params[name] for name in names] for names in groups.values()]
        self._targets = [[[ema[name] for name in names] for names in groups.values()] for ema in self.emas]

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step < 1:
            raise ValueError(f"PowerFunctionEMA.update takes the number of optimizer steps done (>= 1), got {step}")
        for gamma, targets in zip(self.gammas, self._targets):
            weight = 1.0 - power_function_beta(step, gamma)
            for target, source in zip(targets, self._sources):
                torch._foreach_lerp_(target, source, weight)

    def snapshot(self) -> dict[float, StateDict]:
        """{sigma_rel: CPU copy of that EMA's state dict}, to save with the step number."""
        return {std: {k: v.detach().cpu().clone() for k, v in ema.items()} for std, ema in zip(self.stds, self.emas)}

    def state_dict(self) -> dict:
        return {"stds": list(self.stds), "emas": self.emas}

    def load_state_dict(self, state: Mapping) -> None:
        stds = tuple(float(s) for s in state["stds"])
        if stds != self.stds:
            raise ValueError(f"checkpoint tracks post-hoc EMA stds {stds}, this run tracks {self.stds}; "
                             "set the EMA stds in the config to the checkpoint's")
        for ema, saved in zip(self.emas, state["emas"]):
            if set(saved) != set(ema):
                raise KeyError("post-hoc EMA state does not match the model's state dict keys; "
                               "was it saved from a different model?")
            for key, value in saved.items():
                ema[key].copy_(value)


# --- snapshots: written by the trainer, read by the evaluator ---------------------------

class MissingSnapshotsError(FileNotFoundError):
    """Post-hoc EMA snapshots that the run's config says were written are not on disk."""


def snapshot_name(step: int, std: float) -> str:
    return f"phema-{step:08d}-{std:.3f}.safetensors"


def snapshot_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "phema"


def snapshot_steps(cfg: TrainConfig, up_to_step: int) -> list[int]:
    """The steps at which a run with `cfg` writes snapshots, up to checkpoint step `up_to_step`:
    every `phema_every` steps, or (phema_every=0) at every checkpoint, `up_to_step` included.
    A checkpoint written by a stop between scheduled ones has a snapshot too, but only the one
    at `up_to_step` is known from the config."""
    if not cfg.phema_stds:
        return []
    if cfg.phema_every:
        return list(range(cfg.phema_every, up_to_step + 1, cfg.phema_every))
    return sorted(set(range(cfg.checkpoint.every, up_to_step + 1, cfg.checkpoint.every)) | {up_to_step} - {0})


@dataclass
class SnapshotInventory:
    expected: list[Path]  # the files the config says were written up to the step
    present: list[Path]  # the snapshot files on disk at steps up to the step

    @property
    def missing(self) -> list[Path]:
        on_disk = set(self.present)
        return [p for p in self.expected if p not in on_disk]


def snapshot_inventory(run_dir: str | Path, cfg: TrainConfig, up_to_step: int) -> SnapshotInventory:
    """Expected and present post-hoc EMA snapshots of a run up to checkpoint step `up_to_step`."""
    folder = snapshot_dir(run_dir)
    expected = [folder / snapshot_name(step, std) for step in snapshot_steps(cfg, up_to_step) for std in cfg.phema_stds]
    present = sorted(p for p in folder.glob(SNAPSHOT_GLOB) if int(p.name.split("-")[1]) <= up_to_step)
    return SnapshotInventory(expected, present)


def require_snapshots(run_dir: str | Path, cfg: TrainConfig, up_to_step: int) -> None:
    """Raise MissingSnapshotsError naming the snapshots missing from the grid up to `up_to_step`."""
    missing = snapshot_inventory(run_dir, cfg, up_to_step).missing
    if missing:
        names = ", ".join(p.name for p in missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise MissingSnapshotsError(
            f"{len(missing)} post-hoc EMA snapshot(s) due by step {up_to_step} are missing from "
            f"{snapshot_dir(run_dir)}: {names}. A reconstruction without them gives a different EMA; "
            f"retrain from the checkpoint before the first missing one to write them again")


class PosthocEMATracker:
    """The run's power-function EMAs (cfg.phema_stds) and their snapshots, every cfg.phema_every
    steps or (0) at each checkpoint."""

    def __init__(self, run_dir: Path, model: nn.Module, cfg: TrainConfig, world: World):
        self.dir = snapshot_dir(run_dir)
        self.ema = PowerFunctionEMA(model, cfg.phema_stds)
        self.every = cfg.phema_every
        self.world = world

    def update(self, step: int) -> None:
        self.ema.update(step)

    def maybe_snapshot(self, step: int, *, at_checkpoint: bool) -> None:
        due = step % self.every == 0 if self.every else at_checkpoint
        if not due:
            return
        full = {std: {k: full_tensor(v).detach().cpu().contiguous() for k, v in sd.items()}
                for std, sd in zip(self.ema.stds, self.ema.emas)}  # collective under FSDP: every rank
        if self.world.rank != 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        what = f"the post-hoc EMA snapshots of step {step}"
        require_free_space(self.dir, sum(t.nbytes for state in full.values() for t in state.values()), what,
                           SNAPSHOT_ADVICE)
        for std, state in full.items():
            data = safetensors_bytes(state, metadata={"step": str(step), "std": str(std)})
            path = self.dir / snapshot_name(step, std)
            try:
                atomic_write_bytes(path, data)
            except OSError as err:  # the free space went to another writer since the check
                if not is_disk_full(err):
                    raise
                raise disk_full_error(path, f"{what} (sigma_rel {std})", len(data), SNAPSHOT_ADVICE) from err


class SafetensorsFile(Mapping):
    """A safetensors file's tensors, each read when asked for: combining hundreds of snapshots
    then holds one tensor of each in memory, not every snapshot of a DiT-XL."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with safe_open(str(path), "pt") as f:
            self.names = list(f.keys())
            self.metadata = f.metadata() or {}

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self.path), "pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def read_snapshots(run_dir: str | Path, max_step: int) -> list[tuple[int, float, SafetensorsFile]]:
    """(step, sigma_rel, tensors) of the run's post-hoc EMA snapshots at steps <= max_step,
    ordered by step then sigma_rel. Step and sigma_rel come from the file's metadata (exact,
    where the file name rounds sigma_rel to 3 decimals)."""
    snapshots = []
    for path in sorted(snapshot_dir(run_dir).glob(SNAPSHOT_GLOB)):
        tensors = SafetensorsFile(path)
        step, std = int(tensors.metadata["step"]), float(tensors.metadata["std"])
        if step <= max_step:
            snapshots.append((step, std, tensors))
    return sorted(snapshots, key=lambda s: (s[0], s[1]))
