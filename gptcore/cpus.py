"""The CPUs this process may use: its affinity mask (taskset, a scheduler's binding such as Slurm's
--cpus-per-task), at most the CPU time its cgroup's quota allows (a container's or a job's limit).
Only os and files, no torch: the command line asks this while it is built.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, membership: str | None = None) -> float | None:
    """The tightest cgroup v2 quota (`cpu.max`, "QUOTA PERIOD") over this process's cgroup and its
    parents, in CPUs; None where there is none ("max") or no cgroup v2 to read."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text(encoding="utf-8")
        except OSError:
            return None
    own = next((line[3:] for line in membership.splitlines() if line.startswith("0::")), None)
    if own is None:
        return None
    limits, folder = [], root / own.strip().lstrip("/")
    while True:
        try:
            quota, period = (folder / "cpu.max").read_text(encoding="utf-8").split()[:2]
            if quota != "max":
                limits.append(int(quota) / int(period))
        except (OSError, ValueError, ZeroDivisionError):
            pass
        if folder == root or root not in folder.parents:
            break
        folder = folder.parent
    return min(limits) if limits else None


def usable_cpus() -> int:
    """How many CPUs this process may keep busy at once."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return max(1, min(affinity, math.ceil(limit))) if limit else affinity
