"""The GPUs the project knows: memory, dense peak throughput per precision, NVLink bandwidth,
and the CUDA device names of each type. The planner plans with them (plan.calibration); the
training loop measures its MFU against the dense bf16 peak of the GPU it runs on."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class GPUType:
    name: str
    memory_gib: float | None  # the capacity as sold (HBM is binary: 80 GB = 80 GiB); None: not checked (CPU)
    peak_tflops: dict[str, float]  # dense (no sparsity) tensor-core peaks per precision (bf16 | tf32 | fp32 CUDA-core)
    nvlink_busbw_gbs: float | None  # NCCL all-reduce bus bandwidth between the GPUs of one node (estimate)
    source: str
    device_names: str | None = field(default=None)  # a regex on torch.cuda.get_device_name() of this type


GPUS: dict[str, GPUType] = {g.name: g for g in (
    GPUType("h100", 80, {"bf16": 989, "tf32": 494.5, "fp32": 66.9}, 360,
            "NVIDIA H100 SXM5 datasheet (dense peaks); NVLink 4 bus bandwidth estimated", r"H100(?!.*(PCIe|NVL))"),
    GPUType("h100_pcie", 80, {"bf16": 756, "tf32": 378, "fp32": 51.2}, None,
            "NVIDIA H100 PCIe datasheet (dense peaks); PCIe all-reduce not modelled", r"H100.*PCIe"),
    GPUType("h200", 141, {"bf16": 989, "tf32": 494.5, "fp32": 66.9}, 360,
            "NVIDIA H200 SXM datasheet (dense peaks); NVLink 4 bus bandwidth estimated", r"H200"),
    GPUType("a100_80gb", 80, {"bf16": 312, "tf32": 156, "fp32": 19.5}, 230,
            "NVIDIA A100 SXM4 datasheet (dense peaks); NVLink 3 bus bandwidth estimated", r"A100.*80GB"),
    GPUType("a100_40gb", 40, {"bf16": 312, "tf32": 156, "fp32": 19.5}, 230,
            "NVIDIA A100 SXM4 datasheet (dense peaks); NVLink 3 bus bandwidth estimated", r"A100(?!.*80GB)"),
    # host memory is not checked, no peak estimate (only measured entries), gloo is not modelled
    GPUType("cpu", None, {}, None, "the machine the CPU entries were measured on"),
)}


def gpu_type_of_device(device_name: str) -> str | None:
    """The GPU type whose device_names match a CUDA device's name ("NVIDIA H100 80GB HBM3" -> h100), or None."""
    return next((g.name for g in GPUS.values() if g.device_names and re.search(g.device_names, device_name)), None)


def device_peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device, what MFU is measured against; None on a CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    gpu = gpu_type_of_device(torch.cuda.get_device_name(device))
    return None if gpu is None else GPUS[gpu].peak_tflops.get("bf16")
