"""A background thread per node that samples the hardware about once a second.

Writes <run>/samples/node<R>.jsonl, one JSON object per sample: node CPU% and memory, CPU% and
RSS of every training process on the node (this process and its siblings under the same
launcher), and, where `nvidia-smi` exists, each GPU's utilization, memory, power and temperature.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil

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


def query_gpus(executable: str) -> list[dict]:
    try:
        result = subprocess.run([executable, f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return parse_nvidia_smi(result.stdout) if result.returncode == 0 else []


def training_processes() -> list[psutil.Process]:
    """This process and the other ranks on this node: the children of our parent that run the
    same program (srun/torchrun start the ranks as siblings)."""
    me = psutil.Process()
    try:
        siblings = [p for p in me.parent().children() if p.cmdline()[:3] == me.cmdline()[:3]]
    except (psutil.Error, AttributeError):
        siblings = []
    return [me] + [p for p in siblings if p.pid != me.pid]


class Sampler:
    def __init__(self, out_dir: Path, node_rank: int, interval: float = 1.0):
        self.path = Path(out_dir) / f"node{node_rank}.jsonl"
        self.interval = interval
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="gptcore-sampler", daemon=True)
        self.nvidia_smi = shutil.which("nvidia-smi")
        self.host = socket.gethostname()

    def start(self) -> "Sampler":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.nvidia_smi:
            print("sampler: nvidia-smi not found, sampling CPU and memory only", flush=True)
        self.processes = training_processes()
        for process in self.processes:
            process.cpu_percent(None)  # the first call only starts the measurement
        psutil.cpu_percent(None)
        self.thread.start()
        return self

    def sample(self) -> dict:
        memory = psutil.virtual_memory()
        record = {
            "time": time.time(),
            "host": self.host,
            "cpu_pct": psutil.cpu_percent(None),
            "mem_used_mib": (memory.total - memory.available) / 2**20,
            "mem_total_mib": memory.total / 2**20,
            "procs": [],
        }
        for process in self.processes:
            try:
                with process.oneshot():
                    record["procs"].append({"pid": process.pid, "cpu_pct": process.cpu_percent(None),
                                            "rss_mib": process.memory_info().rss / 2**20})
            except psutil.Error:
                continue
        if self.nvidia_smi:
            record["gpus"] = query_gpus(self.nvidia_smi)
        return record

    def _run(self) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            while not self.stopping.wait(self.interval):
                handle.write(json.dumps(self.sample()) + "\n")
                handle.flush()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=10)


def read_samples(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

