"""A rank that waits on the others far longer than a step takes is hung: it says where it was.

A peer that dies mid-collective without closing its connections, or one that is stopped or stuck,
leaves the others waiting: gloo raises only at the process group's timeout, and NCCL spins on the
GPU until its own watchdog kills the process with no word in Python. This thread watches the
training loop's step boundaries instead. Once the loop is past its first logged window, a step
may take at most `step_timeout_s` (0: ten times the longest logged window since, at least
60 s); before that (start-up, torch.compile) and around evaluations and checkpoint writes, the
longer `timeout_s`. When the limit passes, the rank writes every thread's Python stack (and, on
NCCL, the flight recorder's record of the last collectives) into RUN_DIR/hang/, prints one line
naming the file, and exits with status 1.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from gptcore.files import atomic_write, atomic_write_bytes

MIN_STEP_TIMEOUT_S = 60.0
WINDOW_FACTOR = 10  # auto limit: this many times the longest logged window


def dump_flight_recorder() -> bytes | None:
    """NCCL's flight recorder (TORCH_NCCL_TRACE_BUFFER_SIZE), pickled; None where there is none.
    The function's name changed across PyTorch versions."""
    try:
        import torch._C._distributed_c10d as c10d
    except ImportError:
        return None
    for name in ("_dump_fr_trace", "_dump_nccl_trace"):
        dump = getattr(c10d, name, None)
        if dump is not None:
            try:
                return dump()
            except Exception:  # noqa: BLE001  (no NCCL group, or no recorder: nothing to add)
                return None
    return None


class Watchdog:
    def __init__(self, run_dir: Path, rank: int, timeout_s: float, step_timeout_s: float, kept: callable):
        self.hang_dir = Path(run_dir) / "hang"
        self.rank = rank
        self.timeout_s, self.step_timeout_s = float(timeout_s), float(step_timeout_s)
        self.kept = kept  # -> a phrase about the checkpoint that survives, for the message
        self.limit = self.timeout_s
        self.windows, self.longest = 0, 0.0
        self.step: int | None = None
        self.deadline = time.monotonic() + self.limit
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="gptcore-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self.thread.start()
        return self

    def beat(self, step: int) -> None:
        """The loop reached a step boundary: the next one is due within the current limit."""
        with self.lock:
            self.step = step
            self.deadline = time.monotonic() + self.limit

    def window_done(self, seconds: float) -> None:
        """A logged window took `seconds`. The first one holds the warm-up (torch.compile, first
        calls); from the second on, a step is held to the step limit."""
        with self.lock:
            self.windows += 1
            if self.windows > 1:
                self.longest = max(self.longest, seconds)
                self.limit = self.step_timeout_s or max(MIN_STEP_TIMEOUT_S, WINDOW_FACTOR * self.longest)

    @contextmanager
    def longer(self):
        """Evaluations and checkpoint writes may take the process group's full timeout."""
        with self.lock:
            saved, self.limit = self.limit, self.timeout_s
            self.deadline = time.monotonic() + self.limit
        try:
            yield
        finally:
            with self.lock:
                self.limit = saved
                self.deadline = time.monotonic() + self.limit

    def stop(self) -> None:
        self.stopping.set()

    def _watch(self) -> None:
        while not self.stopping.wait(1.0):
            with self.lock:
                late = time.monotonic() > self.deadline
                limit, step = self.limit, self.step
            if late:
                self._report(limit, step)

    def _report(self, limit: float, step: int | None) -> None:
        where = self.hang_dir / f"rank{self.rank}.txt"
        header = (f"rank {self.rank} (pid {os.getpid()}) waited more than {limit:.0f} s after step "
                  f"{step if step is not None else '(none yet)'}; its threads:\n\n")

        def write(handle):
            handle.write(header.encode())
            handle.flush()
            faulthandler.dump_traceback(handle, all_threads=True)
        try:
            atomic_write(where, write)
            trace = dump_flight_recorder()
            if trace:
                atomic_write_bytes(self.hang_dir / f"nccl_trace_rank{self.rank}.pkl", trace)
            found = f"where its threads were: {where}"
        except OSError as err:
            found = f"its threads' stacks could not be written ({err.strerror})"
        print(f"gptcore: error: rank {self.rank} has waited more than {limit:.0f} s for the other ranks "
              f"after step {step if step is not None else 0} (a rank is stopped, stuck, or died without closing "
              f"its connections; see their logs); {found}; {self.kept()}, and a rerun with resume=auto "
              "continues from it", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
