"""The GPU table: which type a CUDA device name is, and its dense bf16 peak (what MFU is over)."""

import pytest
import torch

from dtr_scale.hardware import GPUS, device_peak_tflops, gpu_type_of_device


@pytest.mark.parametrize("name,gpu", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100_pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100_80gb"), ("NVIDIA A100-SXM4-40GB", "a100_40gb"),
    ("NVIDIA A100-PCIE-40GB", "a100_40gb"), ("Tesla V100-SXM2-16GB", None),
])
def test_cuda_device_names_map_to_their_gpu_type(name, gpu):
    assert gpu_type_of_device(name) == gpu


def test_no_peak_and_no_mfu_off_a_gpu():
    assert device_peak_tflops(torch.device("cpu")) is None


def test_every_gpu_names_its_source_and_the_mfu_peak():
    for gpu in GPUS.values():
        assert gpu.source and (gpu.name == "cpu" or gpu.peak_tflops["bf16"] > gpu.peak_tflops["fp32"])
