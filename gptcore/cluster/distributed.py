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
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from gptcore import cpus
from gptcore.errors import LostRanks, UserInputError


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
    """Pure apart from the scontrol call for srun jobs without MASTER_ADDR. Values that could only
    hang the process group (a rank outside the world, a port that is no port) are refused here."""
    def number(name: str, default: int | None = None) -> int:
        if name not in env or (default is not None and env[name] == ""):
            return default
        try:
            return int(env[name])
        except ValueError:
            raise UserInputError(f"environment variable {name}={env[name]!r} is not an integer") from None

    if "RANK" in env and "WORLD_SIZE" in env:
        # submitit's TorchDistributedEnvironment().export() writes the same variables as torchrun
        launcher = "submitit" if "SUBMITIT_EXECUTOR" in env else "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env"
        contract = RankContract(number("RANK"), number("WORLD_SIZE"), number("LOCAL_RANK", 0),
                                env.get("MASTER_ADDR", "127.0.0.1"), number("MASTER_PORT", 29500), launcher)
        names = ("RANK", "WORLD_SIZE", "MASTER_PORT")
    # SLURM_STEP_NUM_TASKS exists only inside an srun step: a batch script that runs python
    # directly is one process even when the job has several tasks.
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env and number("SLURM_STEP_NUM_TASKS") > 1:
        contract = RankContract(
            number("SLURM_PROCID"), number("SLURM_STEP_NUM_TASKS"), number("SLURM_LOCALID", 0),
            env.get("MASTER_ADDR") or slurm_master_addr(env.get("SLURM_JOB_NODELIST", "")),
            number("MASTER_PORT", port_for_job(env.get("SLURM_JOB_ID", ""))), "srun")
        names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "MASTER_PORT")
    else:
        return RankContract()
    rank_name, world_name, port_name = names
    if contract.world_size < 1:
        raise UserInputError(f"{world_name}={contract.world_size}: there must be at least one rank")
    if not 0 <= contract.rank < contract.world_size:
        raise UserInputError(f"{rank_name}={contract.rank} is not a rank of {world_name}={contract.world_size} "
                             f"(ranks are 0 to {contract.world_size - 1}); check how the ranks were started")
    if contract.local_rank < 0:
        raise UserInputError(f"the local rank {contract.local_rank} is negative; check LOCAL_RANK / SLURM_LOCALID")
    if not 0 < contract.master_port < 65536:
        raise UserInputError(f"{port_name}={contract.master_port} is not a TCP port (1-65535)")
    return contract


def ranks_per_node(contract: RankContract, env=os.environ) -> int | None:
    """How many ranks share this node: LOCAL_WORLD_SIZE (torchrun, submitit), or this srun step's
    tasks on it (SLURM_STEP_TASKS_PER_NODE is `4` or `4(x2)`, the same on every node of a
    uniform step); None for one process or a launch that says nothing."""
    if contract.world_size == 1:
        return 1
    text = env.get("LOCAL_WORLD_SIZE") if contract.launcher != "srun" else env.get("SLURM_STEP_TASKS_PER_NODE")
    head = (text or "").split("(")[0].split(",")[0]
    return int(head) if head.isdigit() else None


@dataclass(frozen=True)
class Threads:
    count: int  # torch intra-op threads of this rank
    source: str  # train.threads | OMP_NUM_THREADS | share
    usable_cpus: int  # CPUs this process may run on (its affinity mask)
    node_cpus: int
    sharing_ranks: int  # ranks the CPUs are divided among

    def record(self) -> dict:
        """The metrics start record's part: how many threads, and why."""
        return {"threads": self.count, "threads_from": self.source, "usable_cpus": self.usable_cpus,
                "node_cpus": self.node_cpus, "sharing_ranks": self.sharing_ranks}

    def reason(self) -> str:
        if self.source != "share":
            return f"from {self.source}"
        return (f"the share of {self.usable_cpus} usable CPU(s) among {self.sharing_ranks} rank(s) on a "
                f"{self.node_cpus}-CPU node")


def thread_share(explicit: int, share_among: int, contract: RankContract, env=os.environ,
                 usable_cpus: int | None = None, node_cpus: int | None = None) -> Threads:
    """One rule for the threads of every rank, however it was started: train.threads, else
    OMP_NUM_THREADS, else the rank's share of the CPUs it may use. The share divides this
    process's CPUs among the ranks on its node when the process may use the whole node (they all
    see the same CPUs), and is all of them when its affinity mask is narrower (a scheduler bound
    the rank to its own cores); under Slurm it is at most the allocation (--cpus-per-task, or the
    node's CPUs over its tasks). So there are never more threads than cores unless asked for.
    share_among (train.cpu_ranks) divides as if that many ranks ran: a sweep sets its largest
    size, so that every size runs the same threads per rank."""
    usable = usable_cpus or cpus.usable_cpus()
    node = node_cpus or os.cpu_count() or usable
    ranks = share_among or ranks_per_node(contract, env) or 1
    if explicit:
        return Threads(explicit, "train.threads", usable, node, ranks)
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return Threads(int(omp), "OMP_NUM_THREADS", usable, node, ranks)
    share = usable // ranks if usable >= node else usable
    per_task, on_node = env.get("SLURM_CPUS_PER_TASK", ""), env.get("SLURM_CPUS_ON_NODE", "")
    if per_task.isdigit():
        share = min(share, int(per_task))
    elif on_node.isdigit():
        share = min(share, int(on_node) // ranks)
    return Threads(max(1, share), "share", usable, node, ranks)


def preflight(contract: RankContract, env=os.environ, cuda_devices: int = 0) -> None:
    """What would make the ranks wait for each other forever, found before they start to: more
    ranks on a node than it has GPUs, a master address that resolves to loopback when ranks on
    other nodes must reach it, a master port already taken where rank 0 must listen."""
    if contract.world_size == 1:
        return
    local = ranks_per_node(contract, env)
    if cuda_devices and local and local > cuda_devices:
        raise UserInputError(f"{local} ranks on {socket.gethostname()} but {cuda_devices} GPU(s) visible there; "
                             f"start {cuda_devices} rank(s) per node (--ntasks-per-node / --nproc-per-node) or "
                             "ask for more GPUs (--gpus-per-node)")
    nodes = env.get("SLURM_JOB_NUM_NODES", "1")
    if nodes.isdigit() and int(nodes) > 1:
        try:
            address = socket.gethostbyname(contract.master_addr)
        except OSError as err:
            raise UserInputError(f"MASTER_ADDR={contract.master_addr} does not resolve on {socket.gethostname()} "
                                 f"({err}); set MASTER_ADDR to the first node's address") from None
        if address.startswith("127."):
            raise UserInputError(
                f"MASTER_ADDR={contract.master_addr} resolves to the loopback address {address} on "
                f"{socket.gethostname()}, which the job's other {int(nodes) - 1} node(s) cannot reach; set "
                "MASTER_ADDR to an address they can (this node's address on the cluster network) or fix /etc/hosts")
    # torchrun's own agent already listens on its port; elsewhere rank 0 is the one to listen.
    if contract.rank == 0 and contract.launcher != "torchrun" and not port_is_free(contract.master_port):
        raise UserInputError(f"MASTER_PORT {contract.master_port} is already in use on {socket.gethostname()} "
                             "(another job or run?); set MASTER_PORT to a free port")


def port_is_free(port: int) -> bool:
    """Whether rank 0 can listen on the port (the process group's store listens there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


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
    if contract.world_size == 1:  # nobody to meet: an in-process store, no port that another run could hold
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(seconds=timeout_s))
        return
    dist.init_process_group(
        backend=backend, init_method=f"tcp://{contract.master_addr}:{contract.master_port}",
        rank=contract.rank, world_size=contract.world_size, timeout=timedelta(seconds=timeout_s))


def backend_name() -> str:
    """What really carries the collectives: nccl, gloo, or none without a process group."""
    return dist.get_backend() if is_initialized() else "none"


def lost_peer(err: BaseException) -> bool:
    """Whether a collective failed because another rank went away (it died, or its node did):
    torch raises DistError subclasses, or, from gloo's transport, a RuntimeError naming gloo."""
    return isinstance(err, dist.DistError) or (isinstance(err, RuntimeError) and "gloo" in str(err))


def lost_ranks(err: BaseException, rank: int, kept: str, saved: bool) -> LostRanks:
    """The one line for a rank whose collective failed because the others went away; `kept`
    says what survives, `saved` whether a checkpoint does (a rerun goes on from it, or starts over)."""
    # gloo's message: "[source file:line] Read error [addr]:port: Connection reset by peer. Advice..."
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    detail = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]
    rerun = "a rerun with resume=auto continues from it" if saved else "a rerun starts from step 0"
    return LostRanks(f"rank {rank} lost the other ranks ({detail}): one of them or its node has died, see their "
                     f"logs; {kept}, and {rerun}")


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
    """The highest value any rank voted (0: no rank raised anything), agreed one call late so that
    the training loop never waits for it: each call collects the all-reduce that the previous call
    started, which ran in gloo's background thread during the step, and starts the next. The vote
    travels on CPU tensors over gloo (a separate gloo group when the training group is NCCL), so it
    never syncs the GPU."""

    def __init__(self):
        self.group = None
        if is_initialized() and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # collective: every rank creates it
        self.pending = None

    def __call__(self, vote: int) -> int:
        if not is_initialized():
            return vote
        agreed = self._collect()
        value = torch.tensor([int(vote)], dtype=torch.int32)
        self.pending = (dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group, async_op=True), value)
        return agreed

    def _collect(self) -> int:
        if self.pending is None:
            return 0
        work, value = self.pending
        work.wait()
        self.pending = None
        return int(value.item())

    def close(self) -> None:
        """Wait for the vote in flight, in this thread (see barrier() for why it matters)."""
        self._collect()


def rank0_first(work):
    """work() on rank 0, then, once it is done, on the other ranks: for preparing files that
    every rank then reads (rank 0 writes them; the others find them ready)."""
    if not is_initialized() or dist.get_rank() == 0:
        result = work()
        barrier()
        return result
    barrier()
    return work()


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


def describe_probe(probe: dict) -> str:
    return (f"all-reduce probe: {probe['bytes'] / 2**20:.0f} MiB over {probe['nodes']} node(s) in "
            f"{1000 * probe['seconds']:.2f} ms, bus bandwidth {probe['busbw_gbps']:.2f} GB/s, "
            f"latency {probe['latency_us']:.0f} us")


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
