"""The rank contract and the process group: who am I, how many are we, where do we meet.

Launchers only set environment variables; this module reads them:
  torchrun / submitit   RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  srun                  SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID; the master is the first
                        host of `scontrol show hostnames $SLURM_JOB_NODELIST`, the port derived
                        from the job id so concurrent jobs on one node do not collide
  nothing               one process, no process group
NCCL on `cuda:LOCAL_RANK` when CUDA is usable, gloo on the CPU otherwise. The choice follows
torch.cuda.is_available(), never CUDA_VISIBLE_DEVICES: a CPU node under Slurm can have it set.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from gptcore.errors import UserInputError


@dataclass(frozen=True)
class RankContract:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # single | torchrun | srun

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def slurm_master_addr(nodelist: str) -> str:
    """First host of a Slurm node list (`node[1-4]` -> `node1`), as `scontrol` expands it."""
    try:
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UserInputError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with scontrol ({err}); set MASTER_ADDR") from None
    hosts = result.stdout.split()
    if result.returncode != 0 or not hosts:
        raise UserInputError(f"`scontrol show hostnames {nodelist}` failed: {result.stderr.strip()}; set MASTER_ADDR")
    return hosts[0]


def port_for_job(job_id: str) -> int:
    return 20000 + int(job_id) % 40000 if job_id.isdigit() else 29500


def read_contract(env=os.environ) -> RankContract:
    """Pure apart from the scontrol call for srun jobs without MASTER_ADDR."""
    def number(name: str) -> int:
        try:
            return int(env[name])
        except ValueError:
            raise UserInputError(f"environment variable {name}={env[name]!r} is not an integer") from None

    if "RANK" in env and "WORLD_SIZE" in env:
        return RankContract(
            rank=number("RANK"), world_size=number("WORLD_SIZE"),
            local_rank=number("LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)), launcher="torchrun")
    # SLURM_STEP_NUM_TASKS exists only inside an srun step: a batch script that runs python
    # directly is one process even when the job has several tasks.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env and number("SLURM_STEP_NUM_TASKS") > 1:
        job_id = env.get("SLURM_JOB_ID", "")
        return RankContract(
            rank=number("SLURM_PROCID"), world_size=number("SLURM_STEP_NUM_TASKS"),
            local_rank=number("SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=env.get("MASTER_ADDR") or slurm_master_addr(env.get("SLURM_JOB_NODELIST", "")),
            master_port=int(env.get("MASTER_PORT") or port_for_job(job_id)), launcher="srun")
    return RankContract()


def choose_device(contract: RankContract, preference: str = "auto") -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserInputError("train.device=cuda but no CUDA device is usable here; use train.device=auto or cpu")
    if preference != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", contract.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group(contract: RankContract, device: torch.device, timeout_s: int) -> None:
    """Join the other ranks; a rank that dies makes the survivors fail after timeout_s, not hang."""
    if contract.world_size == 1:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend, init_method=f"tcp://{contract.master_addr}:{contract.master_port}",
        rank=contract.rank, world_size=contract.world_size, timeout=timedelta(seconds=timeout_s))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on one: ranks must agree to stop at the same step."""
    if not is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor (e.g. RNG states for checkpoints)."""
    if not is_initialized():
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return parts


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()
