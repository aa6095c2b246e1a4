"""What the device can do: native bf16, compiled kernels on the CPU, dense peak FLOP/s and memory
bandwidth of known GPUs.

Peaks are the vendors' dense figures (no sparsity), looked up by the exact name CUDA reports, so
that an H100 PCIe (756 TFLOP/s bf16) is never taken for an SXM card (989). A card not in the table
is "unknown": MFU and bandwidth utilization are then left out rather than guessed, and
`train.peak_tflops` (or a benchmark's --peak-tflops) supplies the figure.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from gptcore.errors import UserInputError


@dataclass(frozen=True)
class Card:
    bf16_tflops: float | None  # dense tensor-core peak; None: no bf16 tensor cores
    tf32_tflops: float | None  # dense, what fp32 matmuls reach with TF32 allowed
    fp32_tflops: float  # plain fp32 (CUDA cores)
    bandwidth_gbps: float  # device memory, GB/s


# torch.cuda.get_device_name() -> the card's datasheet figures.
CARDS = {
    "NVIDIA H100 80GB HBM3": Card(989.4, 494.7, 66.9, 3350),  # H100 SXM5
    "NVIDIA H100 PCIe": Card(756.5, 378.0, 51.2, 2000),
    "NVIDIA H100 NVL": Card(835.5, 417.5, 60.0, 3900),
    "NVIDIA H200": Card(989.4, 494.7, 66.9, 4800),  # H200 SXM
    "NVIDIA H200 NVL": Card(835.5, 417.5, 60.0, 4800),
    "NVIDIA GH200 480GB": Card(989.4, 494.7, 66.9, 4000),
    "NVIDIA A100-SXM4-40GB": Card(312.0, 156.0, 19.5, 1555),
    "NVIDIA A100-SXM4-80GB": Card(312.0, 156.0, 19.5, 2039),
    "NVIDIA A100-PCIE-40GB": Card(312.0, 156.0, 19.5, 1555),
    "NVIDIA A100 80GB PCIe": Card(312.0, 156.0, 19.5, 1935),
    "NVIDIA L40S": Card(362.1, 183.0, 91.6, 864),
    "NVIDIA A10": Card(125.0, 62.5, 31.2, 600),
    "Tesla V100-SXM2-16GB": Card(None, None, 15.7, 900),
    "Tesla V100-SXM2-32GB": Card(None, None, 15.7, 900),
    "Tesla V100-PCIE-16GB": Card(None, None, 14.0, 900),
    "Tesla V100-PCIE-32GB": Card(None, None, 14.0, 900),
    "Tesla V100S-PCIE-32GB": Card(None, None, 16.4, 1134),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


def card(name: str) -> Card | None:
    return CARDS.get(name.strip())


def peak_tflops(name: str, dtype: torch.dtype | None, tf32: bool) -> float | None:
    """Dense peak of the card for the dtype its matmuls run in (None: autocast off, fp32)."""
    known = card(name)
    if known is None:
        return None
    if dtype == torch.bfloat16:
        return known.bf16_tflops
    return known.tf32_tflops if tf32 and known.tf32_tflops else known.fp32_tflops


def mfu(tokens_per_s: float, flops_per_token: float, devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' peak."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / (devices * peak * 1e12)


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run in hardware (1.3-1.7x faster training here, see
    BENCHMARKS.md); elsewhere they are emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_cpu_compile(device: torch.device, asked: str, instead: str) -> None:
    """torch.compile builds its CPU kernels as C++ with the machine's compiler (inductor's own search:
    $CXX, else g++). Where there is none, this says so in one line before anything starts, not
    inductor in a traceback at the first compiled call. ASKED names the setting, INSTEAD the way out."""
    if device.type != "cpu":
        return
    from torch._inductor import cpp_builder, exc  # only when a compile is asked: a second of imports

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise UserInputError(f"{asked} on the CPU needs a C++ compiler to build torch.compile's kernels, and "
                             f"{os.environ.get('CXX', 'g++')} was not found: install one (Debian/Ubuntu: "
                             f"apt install g++) or {instead}") from None


def has_native_bf16(device: torch.device) -> bool:
    """Whether DEVICE does bf16 matmuls in hardware (else it emulates them, slower than fp32)."""
    return cuda_has_native_bf16() if device.type == "cuda" else cpu_has_native_bf16()


def cuda_has_native_bf16() -> bool:
    """Ampere and newer. PyTorch's plain is_bf16_supported() also says yes for V100 and T4, which
    emulate bf16 far slower than fp32."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


@lru_cache(maxsize=None)
def measured_copy_gbps(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """GB/s of a large tensor copy, bytes read plus written, best of `repeats`: the ceiling that
    a memory-bound loop can reach on a device without a datasheet figure (a CPU)."""
    source = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy faults the pages in
        start = time.perf_counter()
        target.copy_(source)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * 4 / best / 1e9


def memory_gbps(device: torch.device) -> tuple[float, str]:
    """The device's memory bandwidth and where the figure comes from."""
    name = device_name(device)
    known = card(name)
    if known is not None:
        return known.bandwidth_gbps, f"{name} datasheet"
    return measured_copy_gbps(device), f"measured copy bandwidth of {name}"
