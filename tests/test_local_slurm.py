"""The local Slurm cluster from env/local_slurm.sh runs real jobs.

Needs the one-node cluster started first (`bash env/local_slurm.sh start`); the module is
skipped when Slurm's clients are missing or the cluster is not up.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "env" / "local_slurm.sh"
TIMEOUT_S = 60.0
# States after which a job will never reach COMPLETED.
FINAL_BAD = {
    "BOOT_FAIL",
    "CANCELLED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "REVOKED",
    "TIMEOUT",
}


def _cluster_env() -> dict[str, str] | None:
    """Environment for Slurm clients pointed at the local cluster, or None if it is not up."""
    if shutil.which("sbatch") is None:
        return None
    try:
        status = subprocess.run(
            ["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60
        )
        if status.returncode != 0:
            return None
        out = subprocess.run(
            ["bash", str(SCRIPT), "env"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    env = dict(os.environ)
    for line in out.splitlines():
        if line.startswith("export SLURM_CONF="):
            env["SLURM_CONF"] = line.split("=", 1)[1].strip()
    return env


ENV = _cluster_env()
pytestmark = [
    pytest.mark.skipif(ENV is None, reason="no local Slurm cluster (sbatch missing or `env/local_slurm.sh status` not up)"),
    pytest.mark.slow, pytest.mark.slurm_cluster("one-node"),
]


def _run(*args: str, timeout: float = 30) -> str:
    res = subprocess.run(list(args), capture_output=True, text=True, env=ENV, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}"
    return res.stdout


def _sbatch(*args: str) -> str:
    job_id = _run("sbatch", "--parsable", "--time=2", *args).strip().split(";")[0]
    assert job_id.isdigit(), f"unexpected sbatch output: {job_id!r}"
    return job_id


def _cancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True, env=ENV, timeout=30)


def _wait_ctld_state(job_id: str, timeout: float = TIMEOUT_S) -> str:
    """Polls slurmctld (works without accounting) until the job has ended; returns its state."""
    deadline = time.monotonic() + timeout
    state = "?"
    while time.monotonic() < deadline:
        out = _run("scontrol", "show", "job", "-o", job_id)
        fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
        state = fields.get("JobState", "?")
        if state == "COMPLETED" or state in FINAL_BAD:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {state} after {timeout:.0f} s")


def test_sbatch_hostname_completes_in_sacct(tmp_path: Path) -> None:
    out_file = tmp_path / "hostname.out"
    job_id = _sbatch("--wrap", "hostname", f"--output={out_file}")
    try:
        # Records reach slurmdbd asynchronously, so sacct may lag slurmctld for a moment.
        deadline = time.monotonic() + TIMEOUT_S
        state = ""
        while time.monotonic() < deadline:
            state = _run("sacct", "-j", job_id, "-n", "-X", "-o", "State").strip()
            state = state.split()[0] if state else ""
            if state == "COMPLETED" or state in FINAL_BAD:
                break
            time.sleep(0.5)
        assert state == "COMPLETED", f"sacct state of job {job_id}: {state or 'none'}"
    finally:
        _cancel(job_id)
    assert out_file.read_text().strip() == socket.gethostname()


def test_four_tasks_four_gpus(tmp_path: Path) -> None:
    out_file = tmp_path / "tasks.out"
    script = tmp_path / "tasks.sh"
    script.write_text(
        "#!/bin/bash\n"
        'echo "batch SLURM_NTASKS=$SLURM_NTASKS"\n'
        "srun bash -c 'echo \"task $SLURM_PROCID $SLURM_NTASKS\"'\n"
    )
    job_id = _sbatch(
        "--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=4", f"--output={out_file}", str(script)
    )
    try:
        state = _wait_ctld_state(job_id)
    finally:
        _cancel(job_id)
    text = out_file.read_text() if out_file.exists() else ""
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{text}"
    lines = text.splitlines()
    assert "batch SLURM_NTASKS=4" in lines, text
    tasks = sorted(line.split()[1:] for line in lines if line.startswith("task "))
    assert tasks == [[str(rank), "4"] for rank in range(4)], text
