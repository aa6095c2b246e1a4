"""Signals from the scheduler: checkpoint at the next step boundary, then stop (and requeue).

- SIGUSR1: Slurm's `--signal=USR1@N` (a warning before the time limit, or a preemption), the one
  the templates ask for: checkpoint, then requeue the job.
- SIGUSR2: what submitit's jobs get for the same; submitit requeues them itself.
- SIGTERM: `scancel`, a time limit without `--signal`, a preemption with GraceTime, a plain kill.
  Checkpoint and stop, without a requeue: a user's scancel sends it too, and nothing tells the two
  apart (Slurm requeues preempted jobs itself where the cluster's PreemptMode says so).
The handlers are installed when a training command starts, before any set-up, and stay until it
ends, its final sample included: a signal then never ends the process with a signal status
(which marks a finished job FAILED and holds back `--dependency=afterok` jobs). The training loop
looks at the flag after every step; several ranks agree on it in the background
(distributed.LaggedVote), so all stop at the same step. SIGINT (Ctrl-C) still interrupts at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

REQUEUEING = ("SIGUSR1", "SIGUSR2")
SIGNALS = tuple(getattr(signal, name) for name in (*REQUEUEING, "SIGTERM") if hasattr(signal, name))


class Flag:
    """The first stop signal received while a training command runs."""

    def __init__(self):
        self.name: str | None = None
        self.depth = 0
        self.previous = {}

    @property
    def raised(self) -> bool:
        return self.name is not None

    @property
    def requeues(self) -> bool:
        return self.name in REQUEUEING

    def _handle(self, signum, frame):
        self.name = self.name or signal.Signals(signum).name


FLAG = Flag()


@contextmanager
def catching():
    """Hold the stop signals for the block; nested blocks share the outer one's handlers. The
    previous handlers come back afterwards, so a launcher's own (submitit's requeue) still runs."""
    if FLAG.depth == 0:
        FLAG.name = None
        FLAG.previous = {sig: signal.signal(sig, FLAG._handle) for sig in SIGNALS}
    FLAG.depth += 1
    try:
        yield FLAG
    finally:
        FLAG.depth -= 1
        if FLAG.depth == 0:
            for sig, handler in FLAG.previous.items():
                if handler is not None:
                    signal.signal(sig, handler)


def requeue_slurm_job() -> str | None:
    """Requeue this Slurm job, or, where the batch script asks for it (GPTCORE_REQUEUE_MARK, set by
    slurm/common.sh), leave it a mark to requeue the job once every rank has exited. Returns what
    was done, for the log; None outside Slurm or when scontrol fails."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    mark = os.environ.get("GPTCORE_REQUEUE_MARK")
    if mark:
        from gptcore.files import atomic_write_bytes  # (here: this module is imported before torch)

        atomic_write_bytes(Path(mark), (job_id + "\n").encode())
        return f"the batch script requeues Slurm job {job_id} once every rank has exited"
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"gptcore: scontrol requeue {job_id} failed: {result.stderr.strip()}", file=sys.stderr)
        return None
    return f"requeued Slurm job {job_id}"
