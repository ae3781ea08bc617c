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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

StateDict = dict[str, torch.Tensor]
MAX_STD = 12**-0.5  # sigma_rel at gamma = 0 (a uniform average over [0, t])


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

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step < 1:
            raise ValueError(f"PowerFunctionEMA.update takes the number of optimizer steps done (>= 1), got {step}")
        current = self.model.state_dict()
        for gamma, ema in zip(self.gammas, self.emas):
            beta = power_function_beta(step, gamma)
            for key, value in current.items():
                if ema[key].is_floating_point():
                    ema[key].lerp_(value.detach().to(ema[key].dtype), 1.0 - beta)
                else:
                    ema[key].copy_(value)

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
