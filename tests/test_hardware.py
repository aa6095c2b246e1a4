"""Device facts: dense peaks looked up by the exact name CUDA reports, MFU from them, and what a
rank or a command is allowed to run on."""

import os

import pytest
import torch

from gptcore.cluster.distributed import cuda_index
from gptcore.errors import UserInputError
from gptcore.inference.generate import resolve_device
from gptcore.telemetry.hardware import CARDS, mfu, peak_tflops


@pytest.mark.parametrize("name, dtype, tf32, peak", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, True, 989.4),  # SXM
    ("NVIDIA H100 PCIe", torch.bfloat16, True, 756.5),
    ("NVIDIA H100 NVL", torch.bfloat16, True, 835.5),
    ("NVIDIA H200", torch.bfloat16, True, 989.4),
    ("NVIDIA A100-SXM4-40GB", torch.bfloat16, True, 312.0),
    ("NVIDIA A100 80GB PCIe", None, True, 156.0),  # fp32 matmuls on TF32
    ("NVIDIA A100 80GB PCIe", None, False, 19.5),  # train.deterministic: plain fp32
    ("NVIDIA L40S", torch.bfloat16, True, 362.1),
    ("NVIDIA A10", torch.bfloat16, True, 125.0),
    ("Tesla V100-SXM2-32GB", None, True, 15.7),  # no TF32: its fp32 peak
    ("Tesla V100-SXM2-32GB", torch.bfloat16, True, None),  # no bf16 tensor cores
    ("NVIDIA H100 Super Ultra", torch.bfloat16, True, None),  # unknown: never a guess by substring
    ("NVIDIA A100", torch.bfloat16, True, None),
    ("CPU", torch.bfloat16, True, None),
])
def test_peaks_come_from_the_exact_card_name(name, dtype, tf32, peak):
    assert peak_tflops(name, dtype, tf32) == peak


def test_every_card_has_a_bandwidth_and_mfu_is_model_flops_over_the_devices_peak():
    assert all(card.bandwidth_gbps > 0 and card.fp32_tflops > 0 for card in CARDS.values())
    # 2 devices of 100 TFLOP/s peak, 1e6 tokens/s at 6e7 FLOPs per token: 6e13 / 2e14.
    assert mfu(1e6, 6e7, 2, 100.0) == pytest.approx(0.3)
    assert mfu(1e6, 6e7, 2, None) is None


def test_a_rank_gets_its_own_gpu_or_a_clear_refusal():
    assert cuda_index(0, 1) == 0 and cuda_index(3, 4) == 3
    with pytest.raises(UserInputError, match="local rank 1 has no GPU of its own: 1 visible"):
        cuda_index(1, 1)  # wrapping around would put two ranks on one GPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA says")
def test_auto_picks_the_cpu_without_cuda_and_a_missing_device_is_refused():
    assert resolve_device("auto", "fp32") == torch.device("cpu")
    assert resolve_device("auto", "int8") == torch.device("cpu")
    assert resolve_device("cpu", "int4") == torch.device("cpu")
    for choice, fragment in (("cuda", "no CUDA device"), ("cuda:1", "no CUDA device"),
                             ("bogus", "not a device"), ("mps", "runs on cpu or cuda")):
        with pytest.raises(UserInputError, match=fragment):
            resolve_device(choice, "fp32")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_int8_and_int4_files_are_refused_on_a_gpu_in_one_line():
    assert resolve_device("auto", "int8") == torch.device("cpu")
    assert resolve_device("cuda", "bf16").type == "cuda"
    for mode in ("int8", "int4"):
        with pytest.raises(UserInputError, match=f"{mode} checkpoints run on the CPU"):
            resolve_device("cuda", mode)


def test_the_usable_cpus_are_at_most_the_tightest_cgroup_quota_above_this_process(tmp_path):
    from gptcore.cpus import cgroup_cpu_limit, usable_cpus

    job = tmp_path / "slurm" / "job_7"
    job.mkdir(parents=True)
    (tmp_path / "cpu.max").write_text("max 100000\n")  # the root: no limit
    (tmp_path / "slurm" / "cpu.max").write_text("400000 100000\n")  # 4 CPUs for all jobs
    (job / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs for this one
    assert cgroup_cpu_limit(tmp_path, "0::/slurm/job_7\n") == 1.5
    (job / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/slurm/job_7\n") == 4.0
    assert cgroup_cpu_limit(tmp_path, "0::/\n") is None  # the root has none
    assert cgroup_cpu_limit(tmp_path, "12:cpu,cpuacct:/x\n") is None  # cgroup v1 only: not read
    assert cgroup_cpu_limit(tmp_path / "absent", "0::/slurm/job_7\n") is None
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
