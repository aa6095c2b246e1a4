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
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gptcore.errors import UserInputError


@dataclass(frozen=True)
class RankContract:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # single | torchrun | submitit | srun

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
            master_port=int(env.get("MASTER_PORT", 29500)),
            # submitit's TorchDistributedEnvironment().export() writes the same variables
            launcher="submitit" if "SUBMITIT_EXECUTOR" in env else "torchrun")
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


def cuda_index(local_rank: int, device_count: int) -> int:
    """The GPU of a rank: its local rank. Wrapping around would put two ranks on one GPU, where
    they compete for its memory and NCCL refuses to run, so more ranks than GPUs is an error."""
    if local_rank >= device_count:
        raise UserInputError(
            f"local rank {local_rank} has no GPU of its own: {device_count} visible on this node "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
            f"{device_count} rank(s) per node, or train.device=cpu")
    return local_rank


def choose_device(contract: RankContract, preference: str = "auto") -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise UserInputError("train.device=cuda but no CUDA device is usable here; use train.device=auto or cpu")
    if preference != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", cuda_index(contract.local_rank, torch.cuda.device_count()))
    return torch.device("cpu")


def nccl_environment(run_dir: str | None, env=os.environ) -> dict[str, str]:
    """NCCL settings for a run, unless the user set them: a collective that fails (a dead peer,
    a timeout) aborts the communicator and raises in Python (error handling 2, "clean up only"),
    instead of killing the process from NCCL's watchdog thread with no message; and the flight
    recorder keeps the last collectives, dumped into the run directory on a timeout."""
    wanted = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    }
    if run_dir:
        wanted["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = os.path.join(run_dir, "hang", "nccl_trace_rank_")
    return {name: value for name, value in wanted.items() if name not in env}


def init_process_group(contract: RankContract, device: torch.device, timeout_s: int, run_dir: str | None = None,
                       single_rank: bool = False) -> None:
    """Join the other ranks; a rank that dies makes the survivors fail after timeout_s, not hang.
    One rank forms no group unless single_rank asks for one (to measure what a group costs)."""
    if contract.world_size == 1 and not single_rank:
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        os.environ.update(nccl_environment(run_dir))
        if run_dir:
            os.makedirs(os.path.join(run_dir, "hang"), exist_ok=True)
    dist.init_process_group(
        backend=backend, init_method=f"tcp://{contract.master_addr}:{contract.master_port}",
        rank=contract.rank, world_size=contract.world_size, timeout=timedelta(seconds=timeout_s))


def backend_name() -> str:
    """What really carries the collectives: nccl, gloo, or none without a process group."""
    return dist.get_backend() if is_initialized() else "none"


def parallelize(model: torch.nn.Module, device: torch.device, compile_model: bool) -> tuple[torch.nn.Module, DistributedDataParallel | None]:
    """The module that training calls, and its DDP wrapper when there is a process group (for
    no_sync). DDP goes inside torch.compile, so that compile splits the graph at DDP's bucket
    boundaries and the all-reduce of one bucket overlaps the backward of the next."""
    ddp = None
    if is_initialized():
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        model = ddp
    return (torch.compile(model) if compile_model else model), ddp


def lost_peer(err: BaseException) -> bool:
    """Whether a collective failed because another rank went away (it died, or its node did):
    torch raises DistError subclasses, or, from gloo's transport, a RuntimeError naming gloo."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "gloo" in str(err))


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


class LaggedVote:
    """Whether any rank raised a flag, agreed one call late so that the training loop never waits
    for it: each call collects the all-reduce that the previous call started, which ran in gloo's
    background thread during the step, and starts the next. The vote travels on CPU tensors over
    gloo (a separate gloo group when the training group is NCCL), so it never syncs the GPU."""

    def __init__(self):
        self.group = None
        if is_initialized() and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # collective: every rank creates it
        self.pending = None

    def __call__(self, flag: bool) -> bool:
        if not is_initialized():
            return flag
        agreed = self._collect()
        value = torch.tensor([int(flag)], dtype=torch.int32)
        self.pending = (dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group, async_op=True), value)
        return agreed

    def _collect(self) -> bool:
        if self.pending is None:
            return False
        work, value = self.pending
        work.wait()
        self.pending = None
        return bool(value.item())

    def close(self) -> None:
        """Wait for the vote in flight, in this thread (see barrier() for why it matters)."""
        self._collect()


def gather_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor (e.g. RNG states for checkpoints)."""
    if not is_initialized():
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return parts


def bus_bandwidth_gbps(nbytes: float, seconds: float, world_size: int) -> float:
    """Ring all-reduce bus bandwidth in GB/s (1e9 bytes per second): each rank sends
    2(n-1)/n x nbytes, so the figure is comparable across rank counts (as in nccl-tests)."""
    return 2 * (world_size - 1) / world_size * nbytes / seconds / 1e9


def _timed_all_reduce(tensor: torch.Tensor, iters: int) -> float:
    """Seconds per all_reduce of tensor, as the slowest rank saw it."""
    for _ in range(2):  # warm-up: gloo/NCCL set up their buffers and connections on first use
        dist.all_reduce(tensor)
    barrier()
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    start = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(tensor)
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)
    seconds = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=tensor.device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds.item()


def probe_allreduce(device: torch.device, megabytes: float = 4, iters: int = 5) -> dict:
    """Time all_reduce of a fixed float32 tensor over the process group: bus bandwidth from a
    large tensor, latency from a one-element one. Collective: every rank must call it."""
    if not is_initialized():
        raise RuntimeError("probe_allreduce needs an initialized process group")
    world_size = dist.get_world_size()
    large = torch.ones(int(megabytes * 2**20) // 4, dtype=torch.float32, device=device)
    seconds = _timed_all_reduce(large, iters)
    latency = _timed_all_reduce(torch.ones(1, dtype=torch.float32, device=device), iters)
    hosts = [None] * world_size
    dist.all_gather_object(hosts, socket.gethostname())
    nbytes = large.numel() * 4
    return {"bytes": nbytes, "seconds": seconds, "busbw_gbps": bus_bandwidth_gbps(nbytes, seconds, world_size),
            "latency_us": 1e6 * latency, "world_size": world_size, "nodes": len(set(hosts))}


# The last barrier's work, kept alive on purpose: see barrier().
_last_barrier = None


def barrier() -> None:
    """Wait for every rank. Gloo's barrier holds on to the collectives still in flight when it was
    issued, and whichever thread drops the last reference frees their Python tensors, which needs
    the GIL. Dropped by gloo's worker thread, that free can deadlock against the main thread
    tearing the group down, or abort the process (`terminate called without an active
    exception`) at interpreter exit. Keeping the work here makes the main thread free it."""
    global _last_barrier
    if is_initialized():
        _last_barrier = dist.barrier(async_op=True)
        _last_barrier.wait()


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()
