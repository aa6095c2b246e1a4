"""A stop at any moment of a multi-rank run ends every rank within a bounded time, as a scheduler
or a user delivers it: a signal to torchrun's whole process group, a launcher that dies under its
ranks, a signal to a rank stuck in its rendezvous."""

import os
import re
import random
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import REPO, wait_until
from gptcore.cluster.preemption import stray_sigterm
from gptcore.checkpointing.sharded import open_checkpoint

# Each test sends signals to several ranks at seeded moments: tens of seconds in all.
pytestmark = pytest.mark.slow

TINY = ["--config", "tiny", "train.device=cpu", "train.sample_tokens=0", "train.max_iters=100000",
        "train.log_interval=10", "train.eval_interval=100000", "train.ckpt_interval=100000", "train.timeout_s=20"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(run_dir, corpus, *overrides) -> subprocess.Popen:
    """Two ranks under torchrun, in a session of their own (as a batch job's processes are)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "gptcore",
               "train", *TINY, f"data.path={corpus}", f"out_dir={run_dir}", *overrides]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def ranks_of(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The gptcore ranks torchrun started (each in a session of its own, as torchrun does it)."""
    try:
        children = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [p for p in children if "gptcore" in " ".join(p.cmdline())]


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    found = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.NoSuchProcess:
            continue
    return found


def end_all(launcher: subprocess.Popen, ranks: list[psutil.Process]) -> None:
    for process in alive(ranks):
        process.kill()
    launcher.kill()
    launcher.wait(timeout=10)


# SIGTERM at 1.0, 3.8 and 5.1 s; SIGINT (Ctrl-C at the terminal that runs torchrun) at 5.7 s.
@pytest.mark.parametrize("parallel,seed,signum", [("ddp", 1, signal.SIGTERM), ("fsdp", 5, signal.SIGTERM),
                                                  ("ddp", 0, signal.SIGTERM), ("fsdp", 2, signal.SIGINT)])
def test_a_signal_to_torchruns_group_at_a_random_moment_ends_every_rank(parallel, seed, signum, tmp_path, corpus):
    """What `scancel` (SIGTERM) or a Ctrl-C (SIGINT) does to a torchrun job: the signal to every
    process of torchrun's group at a moment drawn from the seed (set-up or training). Every rank
    is gone within seconds, and a checkpoint, where one was written, loads."""
    launcher, ranks = torchrun(tmp_path / "run", corpus, f"train.parallel={parallel}"), []
    try:
        ranks = wait_until(lambda: ranks_of(launcher) if len(ranks_of(launcher)) == 2 else None, 30, "two ranks")
        time.sleep(random.Random(seed).uniform(0.2, 6.0))
        os.killpg(launcher.pid, signum)  # torchrun's group: its ranks each lead a session of their own
        signalled = time.monotonic()
        wait_until(lambda: not alive(ranks) and launcher.poll() is not None, 25, "every rank to end after the signal")
        took = time.monotonic() - signalled
        output = launcher.communicate(timeout=10)[0]
    finally:
        end_all(launcher, ranks)
    assert took < 25, output
    # torchrun's agent ends a signal with its own traceback after its ranks exit (the README says
    # so); the ranks print none. The agent passes a SIGINT on to its ranks as a SIGTERM.
    assert output.count("Traceback") == output.count("api.SignalException: Process"), output[-3000:]
    run_dir = tmp_path / "run"
    saved = (run_dir / "ckpt.pt").exists() or any(run_dir.glob("ckpt-*"))  # ddp: a file; fsdp: shards
    if saved:  # stopped in the loop: the agreed step's checkpoint, which loads
        assert "stopped by SIGTERM at step" in output
        assert open_checkpoint(run_dir / "ckpt.pt" if parallel == "ddp" else run_dir)["step"] > 0
    else:  # stopped in set-up: nothing claims a checkpoint
        assert "checkpoint" not in output or "stopped during set-up" in output, output[-3000:]


def test_ranks_whose_launcher_is_killed_stop_at_an_agreed_step_with_a_checkpoint(tmp_path, corpus):
    launcher, ranks = torchrun(tmp_path / "run", corpus), []
    try:
        for line in launcher.stdout:  # rank 0's log comes through torchrun
            if "step 50/" in line:
                break
        ranks = ranks_of(launcher)
        assert len(ranks) == 2
        os.kill(launcher.pid, signal.SIGKILL)  # the agent alone: its ranks would train on unsupervised
        wait_until(lambda: not alive(ranks), 25, "both ranks to stop after their launcher died")
        output = launcher.stdout.read()
    finally:
        end_all(launcher, ranks)
    # The rank that notices first stops them all, and every rank names its reason.
    assert "stopped by its launcher's exit at step" in output, output[-3000:]
    assert 50 <= torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] < 100000


def test_a_rank_stuck_in_its_rendezvous_ends_soon_after_a_signal(tmp_path, corpus):
    """Rank 0 of 2 with no rank 1: it waits in C++ for its peer, where Python's handler cannot
    run. A SIGTERM ends it after half of train.timeout_s, not at the timeout, and exit 0."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    rank = subprocess.Popen([sys.executable, "-m", "gptcore", "train", *TINY, f"data.path={corpus}",
                             f"out_dir={tmp_path / 'run'}", "train.timeout_s=24"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        listening = lambda: any(c.laddr.port == port and c.status == psutil.CONN_LISTEN  # noqa: E731
                                for c in psutil.Process(rank.pid).net_connections())
        wait_until(listening, 30, "rank 0 to wait for its peer")
        rank.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        out, err = rank.communicate(timeout=30)
        took = time.monotonic() - signalled
    finally:
        rank.kill()
    assert rank.returncode == 0, (rank.returncode, err)
    assert "rank 0 stopped during set-up: SIGTERM arrived" in err and "nothing was trained" in err, err
    assert took < 20, took  # the grace (12 s), well before the 24 s timeout
    assert not (tmp_path / "run" / "ckpt.pt").exists()


@pytest.mark.parametrize("seed", [0, 1, 2])  # at 3.5, 1.4 and 3.9 s after start
def test_a_sigterm_to_a_one_rank_sharded_run_saving_every_other_step_leaves_a_whole_checkpoint(seed, tmp_path,
                                                                                             corpus):
    """train.parallel=fsdp on one rank, a sharded save every 2 steps: a SIGTERM at a seeded moment
    lands in set-up, in a step or in a save. The process ends with exit 0 within seconds, at a step
    whose checkpoint is the newest, loads, and has no temporary directory left beside it."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "gptcore", "train", *TINY, f"data.path={corpus}",
                                f"out_dir={run_dir}", "train.parallel=fsdp", "train.ckpt_interval=2"],
                               cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(random.Random(seed).uniform(1.0, 4.0))
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0 and "Traceback" not in err, (process.returncode, err)
    step = int(re.search(r"stopped by SIGTERM at step (\d+)/", out).group(1))
    assert open_checkpoint(run_dir)["step"] == step and sorted(p.name for p in run_dir.glob("*ckpt-*")) == [
        f"ckpt-{step:08d}"]


@pytest.mark.parametrize("stopped_by, restarts", [("SIGTERM", "0"), ("SIGTERM", ""), ("SIGUSR1", "1"),
                                                  ("SIGUSR2", "1"), ("its launcher's exit", "1")])
def test_only_a_sigterm_in_a_requeued_job_may_be_a_stray_one(monkeypatch, stopped_by, restarts):
    """A job's first run has no earlier run to send it a late signal, and only SIGTERM is what a
    step's end sends. (The stray case, a step-only SIGTERM after a requeue, is in test_slurm.py.)"""
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
    assert not stray_sigterm(stopped_by)


def test_a_sigterm_while_a_finished_training_exits_leaves_exit_status_0(tmp_path, corpus):
    """A scancel (or a step's end) that reaches a rank after the training has printed its summary,
    while the interpreter tears down: the job must not end FAILED with its model complete. The
    signal is sent from an exit function, inside that teardown, where it would otherwise kill."""
    argv = ["train", *TINY, "train.max_iters=4", f"data.path={corpus}", f"out_dir={tmp_path / 'run'}"]
    late_sigterm = ("import atexit, os, runpy, signal, sys; atexit.register(os.kill, os.getpid(), signal.SIGTERM); "
                    f"sys.argv[1:] = {argv!r}; runpy.run_module('gptcore', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", late_sigterm], cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "done: 4 steps" in done.stdout and (tmp_path / "run" / "ckpt.pt").exists()
