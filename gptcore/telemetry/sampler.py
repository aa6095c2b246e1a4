"""A background thread per node that samples the hardware about once a second.

Writes <run>/samples/node<R>.jsonl, one JSON object per sample: node CPU% and memory, CPU% and
RSS of every training process on the node (this process and its siblings under the same
launcher, each with its child processes, such as torch.compile's workers), the CPU that every
other process on the node took meanwhile (`others_cpu_pct`, % of the node: the load a shared
node puts beside the run), and, where `nvidia-smi` exists, each GPU's utilization, memory, power
and temperature. Per-process CPU is in % of one core; node-wide figures in % of all cores.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import threading
import time
from pathlib import Path

import psutil

from gptcore.cluster.spinning import SHARED_NODE_PCT

GPU_QUERY = "index,utilization.gpu,memory.used,memory.total,power.draw,temperature.gpu"
GPU_FIELDS = ("index", "util_pct", "mem_used_mib", "mem_total_mib", "power_w", "temp_c")


def parse_nvidia_smi(text: str) -> list[dict]:
    """Rows of `nvidia-smi --query-gpu=... --format=csv,noheader,nounits`; '[N/A]' becomes None."""
    gpus = []
    for line in text.strip().splitlines():
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != len(GPU_FIELDS):
            continue
        row = {}
        for name, cell in zip(GPU_FIELDS, cells):
            try:
                row[name] = float(cell)
            except ValueError:
                row[name] = None
        row["index"] = int(row["index"]) if row["index"] is not None else len(gpus)
        gpus.append(row)
    return gpus


def describe_gpu(gpu: dict) -> str:
    """One parsed nvidia-smi row in words; what nvidia-smi reported as [N/A] reads 'unknown'."""
    def field(name: str, unit: str, digits: int = 0) -> str:
        value = gpu.get(name)
        return "unknown " + unit.strip() if value is None else f"{value:,.{digits}f}{unit}"
    return (f"gpu{gpu['index']} {field('mem_total_mib', ' MiB')}, {field('util_pct', '% busy')}, "
            f"{field('power_w', ' W', 1)}, {field('temp_c', ' C')}")


def visible_gpus(gpus: list[dict], cuda_visible_devices: str | None) -> list[dict]:
    """The job's own GPUs: nvidia-smi lists the whole node, CUDA_VISIBLE_DEVICES (set by Slurm's
    --gpus) names ours. Kept whole when the variable is unset, not indices, or matches nothing."""
    wanted = {int(part) for part in (cuda_visible_devices or "").split(",") if part.strip().isdigit()}
    ours = [gpu for gpu in gpus if gpu["index"] in wanted]
    return ours or gpus


def query_gpus(executable: str) -> list[dict]:
    try:
        result = subprocess.run([executable, f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(result.stdout) if result.returncode == 0 else []


# Variables that srun, torchrun and submitit's local executor put in every rank's initial
# environment, the same for all the ranks of one launch: they tell our siblings apart from other
# programs started by the same parent.
LAUNCH_VARS = ("SLURM_JOB_ID", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID", "MASTER_PORT", "SUBMITIT_LOCAL_JOB_ID")
RANK_VARS = ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID")


def launch_identity(environ: dict) -> tuple:
    return tuple(environ.get(name) for name in LAUNCH_VARS)


def rank_of(environ: dict) -> int | None:
    value = next((environ[name] for name in RANK_VARS if name in environ), "")
    return int(value) if value.isdigit() else None


def training_processes(my_rank: int, world_size: int) -> list[tuple[int | None, psutil.Process]]:
    """(rank, process) for this process and the other ranks on this node. srun and torchrun
    start the ranks as children of one parent (slurmstepd, torchrun's agent, submitit's local
    controller), all with the same command line and launch variables. Environments are read
    from /proc, as each process started: submitit exports RANK later, inside the process."""
    me = psutil.Process()
    found = [(my_rank, me)]
    if world_size == 1:
        return found
    try:
        my_env = me.environ()
    except psutil.Error:
        return found
    try:
        siblings = [p for p in me.parent().children() if p.pid != me.pid]
    except (psutil.Error, AttributeError):
        return found
    for process in siblings:
        try:
            env = process.environ()
            if process.cmdline() == me.cmdline() and launch_identity(env) == launch_identity(my_env):
                found.append((rank_of(env), process))
        except psutil.Error:
            continue
    return sorted(found, key=lambda pair: (pair[0] is None, pair[0] or 0))


class Sampler:
    def __init__(self, out_dir: Path, node_rank: int, interval: float = 1.0, world_size: int = 1):
        self.node_rank, self.world_size = node_rank, world_size
        self.path = Path(out_dir) / f"node{node_rank}.jsonl"
        self.interval = interval
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gptcore-sampler", daemon=True)
        self.nvidia_smi = shutil.which("nvidia-smi")
        self.host = socket.gethostname()
        self.children: dict[int, psutil.Process] = {}

    def start(self) -> "Sampler":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.nvidia_smi:
            print("sampler: nvidia-smi not found, sampling CPU and memory only", flush=True)
        self.processes = training_processes(self.node_rank, self.world_size)
        self.thread.start()
        return self

    def sample(self) -> dict:
        memory = psutil.virtual_memory()
        record = {
            "time": time.time(),
            "host": self.host,
            "cpu_pct": psutil.cpu_percent(None),
            "cpus": psutil.cpu_count(),
            "mem_used_mib": (memory.total - memory.available) / 2**20,
            "mem_total_mib": memory.total / 2**20,
            "procs": [],
        }
        ours = 0.0
        for rank, process in self.processes:
            try:
                with process.oneshot():
                    record["procs"].append({"rank": rank, "pid": process.pid, "cpu_pct": process.cpu_percent(None),
                                            "rss_mib": process.memory_info().rss / 2**20})
                ours += record["procs"][-1]["cpu_pct"] + self.children_cpu(process)
            except psutil.Error:
                continue
        record["others_cpu_pct"] = others_cpu_pct(record["cpu_pct"], ours, psutil.cpu_count() or 1)
        if self.nvidia_smi:
            record["gpus"] = visible_gpus(query_gpus(self.nvidia_smi), os.environ.get("CUDA_VISIBLE_DEVICES"))
        return record

    def children_cpu(self, process: psutil.Process) -> float:
        """CPU % of one core that a rank's child processes took since the last sample (a child
        seen for the first time starts its measurement now, and counts from the next sample)."""
        total = 0.0
        for child in process.children(recursive=True):
            try:
                known = self.children.setdefault(child.pid, child)
                total += known.cpu_percent(None)
            except psutil.Error:
                continue
        return total

    def _run(self) -> None:
        # The first cpu_percent call only starts the measurement; psutil keeps the node-wide
        # baseline per thread, so it must be taken in this one.
        for _, process in self.processes:
            process.cpu_percent(None)
        psutil.cpu_percent(None)
        # One last sample when stopped covers the tail, so even a run shorter than the interval
        # has one.
        with open(self.path, "a", encoding="utf-8") as handle:
            stopped = False
            while not stopped:
                stopped = self.stopping.wait(self.interval)
                handle.write(json.dumps(self.sample()) + "\n")
                handle.flush()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)


def others_cpu_pct(node_pct: float, ours_pct_of_core: float, cpus: int) -> float:
    """The node's CPU use (% of all cores) that our processes do not account for: the load of
    everyone else on the node, in % of the node."""
    return max(0.0, node_pct - ours_pct_of_core / cpus)


def read_samples(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summarize_samples(samples: list[dict]) -> dict:
    """Medians and peaks of one node's sampler timeline."""
    if not samples:
        return {}
    summary = {
        "samples": len(samples),
        "node_cpu_pct": statistics.median(s["cpu_pct"] for s in samples),
        "node_mem_used_mib": max(s["mem_used_mib"] for s in samples),
    }
    others = [s["others_cpu_pct"] for s in samples if "others_cpu_pct" in s]
    if others:
        summary["others_cpu_pct"] = statistics.median(others)
    ranks: dict[int, list[dict]] = {}
    for sample in samples:
        for proc in sample.get("procs", []):
            ranks.setdefault(proc.get("rank"), []).append(proc)
    summary["ranks"] = {str(rank): {"cpu_pct": statistics.median(p["cpu_pct"] for p in procs),
                                    "rss_peak_mib": max(p["rss_mib"] for p in procs)}
                        for rank, procs in sorted(ranks.items(), key=lambda item: str(item[0]))}
    gpus: dict[int, list[dict]] = {}
    for sample in samples:
        for gpu in sample.get("gpus", []):
            gpus.setdefault(gpu["index"], []).append(gpu)
    if gpus:
        summary["gpus"] = {str(index): {
            "util_pct": statistics.median(g["util_pct"] for g in rows if g["util_pct"] is not None),
            "mem_peak_mib": max(g["mem_used_mib"] or 0.0 for g in rows),
            "mem_total_mib": max(g["mem_total_mib"] or 0.0 for g in rows),
        } for index, rows in sorted(gpus.items()) if any(g["util_pct"] is not None for g in rows)}
    return summary


def shared_node_load(steps: list[dict], samples: list[dict]) -> dict | None:
    """What other processes on the node cost a training session; None when they took at most
    SHARED_NODE_PCT of it. STEPS are the session's logged step records (step, time, ms_per_step),
    SAMPLES its node's hardware samples. Each logged window is quiet or shared by the samples taken
    during it; the quiet windows' median ms/step, over every step, is the time the session would
    have taken alone (None where no window was quiet)."""
    windows, before = [], None
    for record in steps:
        if before is not None:
            during = [s["others_cpu_pct"] for s in samples if before["time"] < s["time"] <= record["time"]]
            if during:
                windows.append((record["step"] - before["step"], record["ms_per_step"], statistics.median(during)))
        before = record
    others = [s["others_cpu_pct"] for s in samples if steps and steps[0]["time"] < s["time"] <= steps[-1]["time"]]
    if not windows or (others_pct := statistics.median(others)) <= SHARED_NODE_PCT:
        return None
    quiet = [ms for _, ms, load in windows if load <= SHARED_NODE_PCT]
    quiet_ms = statistics.median(quiet) if quiet else None
    took = sum(count * ms for count, ms, _ in windows) / 1000
    alone = quiet_ms * sum(count for count, _, _ in windows) / 1000 if quiet else None
    return {"others_pct": others_pct, "samples": len(others), "took_s": took, "alone_s": alone, "quiet_ms": quiet_ms,
            "quiet_windows": len(quiet)}


def describe_cost(load: dict) -> str:
    """What a shared node cost (shared_node_load), after the share itself."""
    if load["alone_s"] is None:
        return "no logged window ran without them, so what they cost is not known"
    return (f"its steps took {load['took_s']:.0f} s, about {load['alone_s']:.0f} s at the {load['quiet_ms']:.0f} "
            f"ms/step of its {load['quiet_windows']} quiet window(s) ({load['took_s'] / load['alone_s']:.1f}x)")


def shared_node_cost(steps: list[dict], samples: list[dict]) -> str | None:
    """shared_node_load as the line a training ends with."""
    load = shared_node_load(steps, samples)
    if load is None:
        return None
    line = (f"shared node: other processes used {load['others_pct']:.0f}% of its CPU while this run trained "
            f"(median of {load['samples']} samples)")
    return line + ("; " if load["alone_s"] is None else ": ") + describe_cost(load)
