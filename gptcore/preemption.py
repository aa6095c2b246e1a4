"""Signals from the scheduler: checkpoint at the next step boundary, then requeue the job.

Slurm's `--signal=USR1@N` (a warning before the time limit, or a preemption) sends SIGUSR1;
submitit's jobs get SIGUSR2. The training loop looks at the flag after every step; several ranks
agree on it in the background (distributed.LaggedVote), so all stop at the same step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


class PreemptionFlag:
    """Raised by SIGUSR1 or SIGUSR2 while the loop runs. The previous handlers come back
    afterwards, so a launcher's own handler (submitit's requeue) still runs."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2") if hasattr(signal, name))

    def __init__(self):
        self.raised = False
        self.previous = {}

    def __enter__(self):
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
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
        Path(mark).write_text(job_id + "\n")
        return f"the batch script requeues Slurm job {job_id} once every rank has exited"
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"gptcore: scontrol requeue {job_id} failed: {result.stderr.strip()}", file=sys.stderr)
        return None
    return f"requeued Slurm job {job_id}"
