"""How torch's OpenMP threads wait for work, chosen before torch is imported (libgomp reads its
settings once, when it loads).

libgomp's threads spin about 300,000 times before they sleep. On a node another job is using, two
processes' spinning threads take each other's time slices: beside a 2-thread training on 2 cores
the quick start took 4.3x its quiet time (BENCHMARKS.md, "A training beside another job"). 10,000
spins cost nothing on a quiet node and help beside a job; waiting passively helps most there, but
is slower on a quiet node. So a training that starts on a busy node waits passively, and every
other command, or a training on a quiet node, spins 10,000 times. A setting of the user's own
(OMP_WAIT_POLICY or GOMP_SPINCOUNT) is kept.
"""

from __future__ import annotations

import os

BOUNDED_SPIN = "10000"
SHARED_NODE_PCT = 10.0  # others' CPU, in % of the node, above which a node counts as shared


def wait_setting(busy_pct: float | None) -> dict[str, str]:
    """The environment that sets the wait: passive where the node was measured shared (BUSY_PCT,
    % of all its CPUs; None where not measured), else a bounded spin."""
    if busy_pct is not None and busy_pct > SHARED_NODE_PCT:
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {"GOMP_SPINCOUNT": BOUNDED_SPIN}


def node_busy_pct(seconds: float = 0.3) -> float:
    """The node's CPU use over SECONDS, in % of all its CPUs, while this process only waits: the
    load of everyone else."""
    import psutil

    return psutil.cpu_percent(interval=seconds)


def one_process(environ) -> bool:
    """True for a process that is not one rank among several started together (whose siblings'
    start-up would read as load)."""
    return int(environ.get("WORLD_SIZE") or environ.get("SLURM_NTASKS") or 1) == 1


def set_wait_policy(command: str, environ=os.environ) -> None:
    """Chooses the wait for COMMAND before torch is imported, unless the user chose one (OMP_WAIT_POLICY
    or GOMP_SPINCOUNT). Only a training, the one command that runs for minutes, spends a moment
    measuring the node, and not where OMP_NUM_THREADS=1 leaves no thread to wait."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return
    measure = command == "train" and one_process(environ) and environ.get("OMP_NUM_THREADS") != "1"
    environ.update(wait_setting(node_busy_pct() if measure else None))
