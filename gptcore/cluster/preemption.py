"""Signals from the scheduler: checkpoint at the next step boundary, then stop (and requeue).

- SIGUSR1: Slurm's `--signal=USR1@N` (a warning before the time limit, or a preemption), the one
  the templates ask for: checkpoint, then requeue the job.
- SIGUSR2: what submitit's jobs get for the same; submitit requeues them itself.
- SIGTERM: `scancel`, a time limit without `--signal`, a preemption with GraceTime, a plain kill.
  Checkpoint and stop, without a requeue: a user's scancel sends it too, and nothing tells the two
  apart (Slurm requeues preempted jobs itself where the cluster's PreemptMode says so). The one
  SIGTERM the templates resume from is a stray one (stray_sigterm): a requeued job's previous run
  signalling the step that now has its old id.
The handlers are installed when a training command starts, before any set-up, and stay until it
ends, its final sample included; from then to the process's exit the signals are ignored
(ignore_while_exiting). A signal then never ends the process with a signal status (which marks
a finished job FAILED and holds back `--dependency=afterok` jobs). The training loop
looks at the flag after every step; several ranks agree on it in the background
(distributed.LaggedVote), so all stop at the same step. SIGINT (Ctrl-C) still interrupts at once.

Set-up is where Python's handler may not run at all: the main thread can sit for minutes inside
C++ (a rendezvous whose launcher has gone, a store that no longer answers), and a Python handler
runs only between bytecodes. So a thread hears each signal on the interpreter's wakeup fd: when
the loop has not begun FLAG.grace_s after a stop signal (30 s, or half of train.timeout_s where
that is less), it ends the process itself, with one line.
Under torchrun the same thread watches the launcher: a rank whose agent has died (its parent
changed) stops, at once in set-up, and at an agreed step with a checkpoint in the loop.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

REQUEUEING = ("SIGUSR1", "SIGUSR2")
GRACE_S = 30.0  # a signalled set-up that has not reached the loop by then is ended (Slurm's KillWait)
LAUNCHER_GONE = "its launcher's exit"  # FLAG.name when torchrun's agent died under a rank
SIGNALS = tuple(getattr(signal, name) for name in (*REQUEUEING, "SIGTERM") if hasattr(signal, name))
# Why a training stops, numbered for the ranks' vote, which takes the highest: a requeueing
# signal wins, so that every rank names the same reason and the job is requeued whichever rank
# heard the signal first.
STOP_REASONS = (LAUNCHER_GONE, "SIGTERM", "SIGUSR2", "SIGUSR1")


class Flag:
    """The first stop signal received while a training command runs, and where the command is:
    "set-up" until the training loop begins, "loop", then "done" (the final sample)."""

    def __init__(self):
        self.name: str | None = None
        self.depth = 0
        self.previous = {}
        self.phase = "set-up"
        self.grace_s = GRACE_S

    @property
    def code(self) -> int:
        """This rank's reason to stop, for the vote: 0 for none, else 1 + its place in STOP_REASONS."""
        return STOP_REASONS.index(self.name) + 1 if self.name in STOP_REASONS else 0

    def agree(self, code: int) -> bool:
        """Take the reason the ranks agreed on (a rank that heard nothing yet stops for the same
        one as the rank that did); whether to stop."""
        if code:
            self.name = STOP_REASONS[code - 1]
        return bool(code)

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
    guard = None
    if FLAG.depth == 0:
        FLAG.name, FLAG.phase, FLAG.grace_s = None, "set-up", GRACE_S
        FLAG.previous = {sig: signal.signal(sig, FLAG._handle) for sig in SIGNALS}
        guard = SetUpGuard()
    FLAG.depth += 1
    try:
        yield FLAG
    finally:
        FLAG.depth -= 1
        if FLAG.depth == 0:
            guard.close()
            for sig, handler in FLAG.previous.items():
                if handler is not None:
                    signal.signal(sig, handler)


def ignore_while_exiting() -> None:
    """From the end of a command to its exit, a stop signal whose handler is the default is
    ignored. The work is done, and the default would end the interpreter's teardown (a second or
    more of torch's destructors) with a signal status: a finished job marked FAILED, its afterok
    jobs held back. SIGINT still ends it, and Slurm's SIGKILL after KillWait a teardown that hangs."""
    for sig in SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, signal.SIG_IGN)  # Python resets its own handlers in teardown, not this


class SetUpGuard:
    """The thread that acts when the main thread cannot (see the module's text)."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        try:
            self.previous_fd = signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        except ValueError:  # not the main thread (a test calling in): Python's handlers only
            self.previous_fd = None
        under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        self.launcher = os.getppid() if under_torchrun else None
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="gptcore-signal-guard", daemon=True)
        if self.previous_fd is not None:
            self.thread.start()

    def _watch(self) -> None:
        heard = {int(sig) for sig in (*SIGNALS, signal.SIGINT)}
        signalled, signalled_at = None, 0.0
        while not self.closing.is_set():
            if select.select([self.read_fd], [], [], 1.0)[0]:
                numbers = [n for n in os.read(self.read_fd, 64) if n in heard]
                if numbers and signalled is None and FLAG.phase == "set-up":
                    signalled, signalled_at = signal.Signals(numbers[0]).name, time.monotonic()
            if self.launcher is not None and os.getppid() != self.launcher and FLAG.phase != "done":
                FLAG.name = FLAG.name or LAUNCHER_GONE
                if FLAG.phase == "set-up":
                    end_set_up(f"its launcher (pid {self.launcher}) has exited")
                self.launcher = None  # in the loop, the ranks agree on a step to stop at
            if signalled and FLAG.phase == "set-up" and time.monotonic() - signalled_at > FLAG.grace_s:
                end_set_up(f"{signalled} arrived, and {FLAG.grace_s:.0f} s later set-up had not reached the "
                           "training loop")

    def close(self) -> None:
        self.closing.set()
        if self.previous_fd is not None:
            signal.set_wakeup_fd(self.previous_fd)
            os.write(self.write_fd, b"\0")  # wakes the thread now (0 is no signal's number)
            self.thread.join(timeout=2)
        os.close(self.read_fd)
        os.close(self.write_fd)


def end_set_up(why: str) -> None:
    """Stop a training command before its loop began: nothing was trained in this session, so
    there is nothing to save, and the exit is 0 like every stop by a signal."""
    rank = os.environ.get("RANK", "0")
    print(f"gptcore: rank {rank} stopped during set-up: {why}; nothing was trained or saved in this session "
          "(an earlier checkpoint is untouched)", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(0)


def tell_slurm(requeue: bool, stray: bool) -> str | None:
    """After a stop by a signal under Slurm: where the batch script asks for it (GPTCORE_STOP_MARK,
    set by slurm/common.sh), leave it a mark saying what to do once every rank has exited (requeue
    if REQUEUE, resume if the signal was a STRAY SIGTERM, else stop); elsewhere requeue the job here
    if REQUEUE. Returns what was done to requeue, for the log; None when nothing was (outside Slurm,
    no requeue, scontrol failed)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return None
    mark = os.environ.get("GPTCORE_STOP_MARK")
    if mark:
        from gptcore.files import atomic_write_bytes  # (here: this module is imported before torch)

        action = "requeue" if requeue else "resume" if stray else "stop"
        atomic_write_bytes(Path(mark), f"{action}\n".encode())
        return f"the batch script requeues Slurm job {job_id} once every rank has exited" if requeue else None
    if not requeue:
        return None
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"gptcore: scontrol requeue {job_id} failed: {result.stderr.strip()}", file=sys.stderr)
        return None
    return f"requeued Slurm job {job_id}"


def stray_sigterm(stopped_by: str | None) -> bool:
    """Whether a stop by SIGTERM came from outside this Slurm job's own end. After a requeue the
    job's previous run can still be signalling its training step for up to KillWait, and the
    rerun's first step has the same id (JOB.0); a scancel, a time limit or a preemption would
    have taken the job out of RUNNING. So: the job was requeued before and is still running."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if stopped_by != "SIGTERM" or not job_id or os.environ.get("SLURM_RESTART_COUNT", "0") in ("", "0"):
        return False
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return "JobState=RUNNING" in shown.stdout.split()
