"""Shared fixtures: a text corpus written by the test, a way to run the real CLI, a run's
metrics, and the Slurm client commands the cluster tests use."""

from __future__ import annotations

import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from gptcore.cpus import usable_cpus
from gptcore.files import atomic_write_bytes
from gptcore.telemetry.metrics import read_metrics
from warm_start import WarmStarter, warm_enough

# The suite runs on 2 cores beside subprocess ranks: one intra-op thread avoids oversubscription.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

WORDS = ("the king and queen walk to the castle while a fool sings of love and war , "
         "my lord speaks softly to the night ; what light through yonder window breaks ? "
         "all the world is a stage and men and women merely players !").split()


def write_corpus(path: Path, chars: int = 60_000, seed: int = 0) -> Path:
    """Deterministic pseudo-English with line breaks: enough structure for a model to learn."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < chars:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize()
        lines.append(line)
        size += len(line) + 1
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` starts one worker per CPU this process may use (affinity and quota), not per CPU of the node."""
    return usable_cpus()


# Seconds each test file took on the 2-core VM (`pytest --record-durations` updates the files a
# run ran). Only the order of files depends on it: a stale or missing entry costs time, never
# a result.
DURATIONS = Path(__file__).with_name("durations.json")
UNKNOWN_FILE_S = 10.0
FILE_SECONDS: dict[str, float] = {}


def pytest_addoption(parser) -> None:
    parser.addoption("--record-durations", action="store_true",
                     help=f"write the seconds of each test file this run ran to {DURATIONS.name}")


def pytest_collection_modifyitems(items) -> None:
    """Longest files first (their tests' order kept within each file): pytest-xdist hands whole
    files to workers in this order (with --no-loadscope-reorder), so the long ones start early and
    the short ones fill in at the end, instead of one worker finishing a long file alone."""
    seconds = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    items.sort(key=lambda item: -seconds.get(item.path.name, UNKNOWN_FILE_S))


def pytest_runtest_logreport(report) -> None:
    """Sums each file's setup, call and teardown seconds (on the controller too, under xdist)."""
    name = report.nodeid.split("::")[0].rsplit("/", 1)[-1]
    FILE_SECONDS[name] = FILE_SECONDS.get(name, 0.0) + report.duration


def pytest_sessionfinish(session) -> None:
    config = session.config
    if config.getoption("--record-durations") and not hasattr(config, "workerinput"):
        # Files this run did not reach keep their earlier seconds.
        seconds = {**(json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}),
                   **{name: round(value, 1) for name, value in FILE_SECONDS.items()}}
        atomic_write_bytes(DURATIONS, (json.dumps(dict(sorted(seconds.items())), indent=1) + "\n").encode())


@pytest.fixture(autouse=True)
def one_test_per_cluster(request):
    """Tests marked slurm_cluster(NAME) take turns on that cluster: pytest-xdist runs several test
    files at once, and two tests sharing the cluster's nodes would wait on each other's jobs."""
    marker = request.node.get_closest_marker("slurm_cluster")
    if marker is None:
        yield
        return
    with open(Path(tempfile.gettempdir()) / f"gptcore-tests-{marker.args[0]}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session", autouse=True)
def torchrun_logs_where_pytest_cleans_up(tmp_path_factory):
    """torchrun leaves a /tmp/torchelastic_* folder behind after every run; the tests' torchruns
    (and the Slurm jobs they submit) put theirs in this session's temporary folder instead."""
    os.environ["PET_LOG_DIR"] = str(tmp_path_factory.mktemp("torchrun-logs"))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


def wait_until(condition, timeout, what):
    """Polls CONDITION until it returns something true, for at most TIMEOUT seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


STARTER: list[WarmStarter] = []  # this worker's, started by its first command


def run_gptcore(*args, timeout: int = 300, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m gptcore ARGS` as a user would run it, output captured as text: a process of its
    own, forked from a warm interpreter where that is the same (warm_start)."""
    base = {**os.environ, "OMP_NUM_THREADS": "1"}
    full_env, argv = {**base, **(env or {})}, [str(a) for a in args]
    if not STARTER:
        STARTER.append(WarmStarter(REPO, base))
    starter = STARTER[0]
    if warm_enough(full_env, starter.env) and starter.lock.acquire(blocking=False):
        try:
            return starter.run("gptcore", argv, cwd, full_env, timeout)
        finally:
            starter.lock.release()
    return subprocess.run([sys.executable, "-m", "gptcore", *argv], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def gptcore_here(capsys, *args) -> subprocess.CompletedProcess:
    """`gptcore ARGS` through the CLI's entry point in this process: what a user would see, for
    checks of argument and file handling where a new process would only add start-up time."""
    from gptcore.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["gptcore", *map(str, args)], code, captured.out, captured.err)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    """The contract for bad input: exit code, one line on stderr naming the problem, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def run_metrics(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl: steps, evaluations, probes."""
    return read_metrics(Path(run_dir) / "metrics.jsonl")


def step_losses(run_dir: Path) -> dict[int, float]:
    """{step: training loss} of every logged step."""
    return {r["step"]: r["loss"] for r in run_metrics(run_dir) if "loss" in r}


# -- Slurm clients, pointed at a cluster by ENV (its SLURM_CONF) ---------------------------------

# The states of a job that has not ended yet.
ACTIVE_JOB_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED"}


def slurm_command(env: dict, *args, timeout: int = 30) -> str:
    """Runs a command from the repository root; its stdout, or the test fails with its output."""
    result = subprocess.run(list(map(str, args)), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, args))}: {result.stdout}{result.stderr}"
    return result.stdout


def job_info(env: dict, job_id: str) -> dict:
    out = slurm_command(env, "scontrol", "show", "job", "-o", job_id)
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_until_ended(env: dict, job_id: str, timeout: float) -> str:
    """The job's final state, once it has one."""
    def final_state():
        state = job_info(env, job_id)["JobState"]
        return None if state in ACTIVE_JOB_STATES else state
    return wait_until(final_state, timeout, f"job {job_id} to end")


@contextmanager
def paused(pids: list[int], what: str):
    """WHAT's training processes PIDS stopped (SIGSTOP) meanwhile, so that a signal sent inside
    reaches them at a known step however fast or slowly this machine runs; they handle it once
    continued."""
    assert pids, f"{what} has no training process"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def sacct(env: dict, job_id: str, fields: str = "State") -> list[str]:
    """The job's accounting record once slurmdbd has it (it arrives a moment after the job ends)."""
    def final():
        out = slurm_command(env, "sacct", "-j", job_id, "-X", "-n", "-P", f"--format={fields}").strip()
        return out.split("|") if out and out.split("|")[0].split()[0] not in ACTIVE_JOB_STATES else None
    return wait_until(final, 30, f"sacct's record of job {job_id}")


# The sweep tests (test_sweep.py, and test_slurm.py on the cluster): a fake nvidia-smi on PATH stands in for
# the GPUs this machine lacks.
FAKE_NVIDIA_SMI = """#!/bin/sh
# nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total,power.draw,temperature.gpu
echo "0, 87, 31245, 81559, 312.45, 64"
echo "1, 85, 31102, 81559, 305.10, 63"
echo "2, 90, 31190, 81559, 318.77, 66"
echo "3, 12, 2, 81559, [N/A], 41"
"""
SWEEP_TRAIN = ["--config", "tiny", "train.device=cpu", "train.max_iters=40", "train.sample_tokens=0", "profile.sampler_interval=0.25"]


@pytest.fixture
def fake_gpus(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def sweep_command(*args) -> list[str]:
    return [sys.executable, "launch/sweep.py", *map(str, args)]


def sweep(*args, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_command(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def report_rows(report_md: Path) -> list[dict[str, str]]:
    """The rows of the Scaling table (Step time, for one size), each {column header: cell}."""
    text = report_md.read_text()
    section = text.split("## Scaling" if "## Scaling" in text else "## Step time")[1].split("##")[0]
    lines = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
             if line.startswith("| ")]
    return [dict(zip(lines[0], cells)) for cells in lines[1:]]
