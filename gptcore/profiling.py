"""Where a training step's time goes: phase timers, per-rank cProfile, a torch.profiler window.

Phase timers split each step into data, forward, backward (which includes DDP's gradient
all-reduce, overlapped with the backward pass) and optimizer; eval and checkpoint are timed when
they happen. On a GPU the step phases are bracketed by CUDA events, which the GPU stamps as it
reaches them: they are read when the window is drained at a log step, with one synchronization
there, so timing never stalls the GPU mid-step. Eval and checkpoint are timed on the host clock.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from gptcore.checkpoint import atomic_write_bytes

STEP_PHASES = ("data", "forward", "backward", "optimizer")


class PhaseTimer:
    def __init__(self, device: torch.device, enabled: bool = True):
        self.events = device.type == "cuda" and enabled
        self.device = device
        self.enabled = enabled
        self.totals: dict[str, float] = defaultdict(float)  # seconds
        self.pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.steps = 0

    @contextmanager
    def phase(self, name: str):
        if not self.enabled:
            yield
            return
        if self.events and name in STEP_PHASES:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self.pending.append((name, start, end))
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.events:
                torch.cuda.synchronize(self.device)
            self.totals[name] += time.perf_counter() - start

    def step_done(self) -> None:
        self.steps += 1

    def drain(self) -> dict[str, float]:
        """Mean milliseconds per step for each phase since the last drain; eval and checkpoint
        are reported as totals (they are not per step)."""
        if self.pending:
            self.pending[-1][2].synchronize()
            for name, start, end in self.pending:
                self.totals[name] += start.elapsed_time(end) / 1000
            self.pending.clear()
        steps = max(self.steps, 1)
        report = {name: round(1000 * self.totals.get(name, 0.0) / steps, 3) for name in STEP_PHASES}
        for name, total in self.totals.items():
            if name not in STEP_PHASES:
                report[name] = round(1000 * total, 3)
        self.totals.clear()
        self.steps = 0
        return report


class LoopProfiler:
    """cProfile over the training loop only (not imports, eval, checkpointing or sampling),
    dumped per rank to <run>/profile/rank<R>.prof with a readable top-25 beside it."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "profile" / f"rank{rank}.prof"
        self.profile = cProfile.Profile() if enabled else None

    @contextmanager
    def active(self):
        if not self.enabled:
            yield
            return
        self.profile.enable()
        try:
            yield
        finally:
            self.profile.disable()

    @contextmanager
    def paused(self):
        if not self.enabled:
            yield
            return
        self.profile.disable()
        try:
            yield
        finally:
            self.profile.enable()

    def dump(self) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".prof.tmp")
        self.profile.dump_stats(tmp)
        tmp.replace(self.path)
        text = io.StringIO()
        pstats.Stats(str(self.path), stream=text).sort_stats("cumulative").print_stats(25)
        atomic_write_bytes(self.path.with_suffix(".txt"), text.getvalue().encode("utf-8"))


class TorchProfilerWindow:
    """A torch.profiler trace of a few steps, written as Chrome JSON (open in chrome://tracing
    or Perfetto)."""

    def __init__(self, run_dir: Path, rank: int, start: int, steps: int, enabled: bool):
        self.enabled = enabled
        self.start, self.stop = start, start + steps
        self.path = Path(run_dir) / "profile" / f"trace_rank{rank}.json"
        self.profiler = None

    def before_step(self, step: int) -> None:
        if self.enabled and step == self.start and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()

    def after_step(self, step: int) -> None:
        if self.profiler is not None and step + 1 >= self.stop:
            self.close()

    def close(self) -> None:
        if self.profiler is None:
            return
        self.profiler.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        self.profiler.export_chrome_trace(str(tmp))
        tmp.replace(self.path)
        self.profiler = None
