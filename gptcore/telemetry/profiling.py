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
import sys
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from types import BuiltinFunctionType, MethodType

import torch

from gptcore.files import atomic_path, atomic_write_bytes

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


class AllReduceTimer:
    """DDP's gradient all-reduce, timed bucket by bucket where it happens: a communication hook
    that does what DDP's default one does (average each bucket over the ranks) and notes when the
    bucket was ready and when its all-reduce finished, on the host clock, or with CUDA events on a
    GPU (read when drained, at log steps). Per step it yields the time some all-reduce was in
    flight, the part of it after the last bucket was ready (what backward had to wait for: the
    communication not hidden behind computing gradients), and the bytes all-reduced."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple] = []  # (ready, done, bytes), floats or CUDA events
        self.steps = 0
        self.step_marks: list[int] = []  # len(self.spans) at each step's end

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def hook(self, group, bucket):
        import torch.distributed as dist

        tensor = bucket.buffer()
        ready = self._now()
        tensor.div_(dist.get_world_size(group))
        future = dist.all_reduce(tensor, group=group, async_op=True).get_future()

        def finished(done_future):
            self.spans.append((ready, self._now(), tensor.numel() * tensor.element_size()))
            return done_future.value()[0]
        return future.then(finished)

    def step_done(self) -> None:
        self.step_marks.append(len(self.spans))

    def drain(self) -> dict[str, float] | None:
        """Per step since the last drain: all-reduce ms in flight, ms exposed after the last
        bucket, bytes, buckets; None when nothing was all-reduced (no DDP step, or no_sync)."""
        if not self.spans or not self.step_marks:
            return None
        if self.cuda:
            # The events were recorded on the streams current when DDP called the hook and when
            # NCCL finished, not one stream: the last one done says nothing of the others.
            for ready, done, _ in self.spans:
                ready.synchronize()
                done.synchronize()
            origin = self.spans[0][0]
            spans = [(origin.elapsed_time(a) / 1000, origin.elapsed_time(b) / 1000, n) for a, b, n in self.spans]
        else:
            spans = self.spans
        in_flight = exposed = 0.0
        start = 0
        for end in self.step_marks:
            step = sorted(spans[start:end])
            if step:
                in_flight += union_seconds([(a, b) for a, b, _ in step])
                exposed += max(0.0, max(b for _, b, _ in step) - max(a for a, _, _ in step))
            start = end
        steps = len(self.step_marks)
        report = {"allreduce_ms": round(1000 * in_flight / steps, 3), "exposed_ms": round(1000 * exposed / steps, 3),
                  "bytes": sum(n for _, _, n in spans) / steps, "buckets": len(spans) / steps}
        self.spans, self.step_marks = self.spans[len(spans):], []
        return report


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals, sorted by start."""
    total, reach = 0.0, float("-inf")
    for start, end in intervals:
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


# The sys.monitoring events through which cProfile hears calls (CPython's _lsprof, 3.12 and later);
# the last three carry the callable.
CPROFILE_EVENTS = ("PY_START", "PY_RESUME", "PY_THROW", "PY_RETURN", "PY_YIELD", "PY_UNWIND",
                   "CALL", "C_RETURN", "C_RAISE")
CALLABLE_EVENTS = ("CALL", "C_RETURN", "C_RAISE")


def heed_only_this_thread() -> None:
    """Make the enabled cProfile see what it saw before Python 3.12: the calls of the calling thread.

    From 3.12 cProfile listens through sys.monitoring, and two things then garble its one call
    stack, so that calls count as recursive and train_step drops out of the top functions:
    - every thread's calls reach it, the loop's side threads' too (watchdog, signal guard,
      checkpoint writer, sampler);
    - a bound method around a C function (every pybind11 method: DDP's reducer, a process
      group) is announced by CALL as the method and by C_RETURN as the function, so the
      return pops a Python frame instead (CPython issue 122029).
    Its callbacks are wrapped to pass on this thread's events only, naming such a call by its
    function both times."""
    monitoring = getattr(sys, "monitoring", None)
    if monitoring is None:
        return
    tool, this_thread = monitoring.PROFILER_ID, threading.get_ident()
    events = monitoring.get_events(tool)
    monitoring.set_events(tool, 0)  # none of the swap's own calls are heard
    for name in CPROFILE_EVENTS:
        event = getattr(monitoring.events, name)
        callback = monitoring.register_callback(tool, event, None)
        if callback is not None:
            wrap = _c_call_from_thread if name in CALLABLE_EVENTS else _from_thread
            monitoring.register_callback(tool, event, wrap(this_thread, callback))
    monitoring.set_events(tool, events)


def _from_thread(thread: int, callback):
    get_ident = threading.get_ident

    def forward(*args):
        if get_ident() == thread:
            return callback(*args)
        return None

    return forward


def _c_call_from_thread(thread: int, callback):
    get_ident = threading.get_ident

    def forward(code, offset, called, arg0):
        if get_ident() == thread:
            if type(called) is MethodType and type(called.__func__) is BuiltinFunctionType:
                called = called.__func__
            return callback(code, offset, called, arg0)
        return None

    return forward


class LoopProfiler:
    """cProfile over the training loop only (not imports, eval, checkpointing or sampling), and
    over the training thread only, dumped per rank to <run>/profile/rank<R>.prof with a readable
    top-25 beside it."""

    def __init__(self, run_dir: Path, rank: int, enabled: bool):
        self.enabled = enabled
        self.path = Path(run_dir) / "profile" / f"rank{rank}.prof"
        self.profile = cProfile.Profile() if enabled else None

    @contextmanager
    def active(self):
        if not self.enabled:
            yield
            return
        self._enable()
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
            self._enable()

    def _enable(self) -> None:
        self.profile.enable()
        heed_only_this_thread()

    def dump(self) -> None:
        if not self.enabled:
            return
        with atomic_path(self.path) as tmp:
            self.profile.dump_stats(tmp)
        text = io.StringIO()
        pstats.Stats(self.profile, stream=text).sort_stats("cumulative").print_stats(25)
        atomic_write_bytes(self.path.with_suffix(".txt"), text.getvalue().encode("utf-8"))


STEP_SPAN = "gptcore.step"  # the name of each traced step's span in a torch.profiler trace
HOST_SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


class TorchProfilerWindow:
    """A torch.profiler trace of a few steps, written as Chrome JSON (open in chrome://tracing
    or Perfetto). Each step is a span named STEP_SPAN, so that what the steps did is told apart
    from what the profiler itself does when it stops (it synchronizes the GPU)."""

    def __init__(self, run_dir: Path, rank: int, start: int, steps: int, enabled: bool):
        self.enabled = enabled
        self.start, self.stop = start, start + steps
        self.path = Path(run_dir) / "profile" / f"trace_rank{rank}.json"
        self.profiler = None
        self.span = None

    def starts_at(self, step: int) -> bool:
        return self.enabled and step == self.start and self.profiler is None

    def acts(self, step: int) -> bool:
        """Whether before_step or after_step does anything at `step`: only then does the loop keep
        them out of cProfile, as pausing and resuming it on every step would cost time itself."""
        return self.profiler is not None or self.starts_at(step)

    def before_step(self, step: int) -> None:
        if self.starts_at(step):
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()
        if self.profiler is not None:
            self.span = torch.profiler.record_function(STEP_SPAN)
            self.span.__enter__()

    def after_step(self, step: int) -> None:
        if self.span is not None:
            self.span.__exit__(None, None, None)
            self.span = None
        if self.profiler is not None and step + 1 >= self.stop:
            self.close()

    def close(self) -> None:
        if self.profiler is None:
            return
        if self.span is not None:
            self.span.__exit__(None, None, None)
            self.span = None
        self.profiler.__exit__(None, None, None)
        with atomic_path(self.path) as tmp:
            self.profiler.export_chrome_trace(str(tmp))
        self.profiler = None


def host_syncs_per_step(events: list[dict]) -> float:
    """Host synchronizations (the CUDA runtime calls that block the CPU until the GPU is done)
    per traced step, from a Chrome trace's events: only those inside a step's span count, not the
    profiler's own when it stops. 0 for a loop that lets the GPU run ahead."""
    spans = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events
             if e.get("name") == STEP_SPAN and e.get("cat", "user_annotation") == "user_annotation" and "ts" in e]
    if not spans:
        return 0.0
    syncs = sum(1 for e in events if e.get("name") in HOST_SYNC_CALLS and "ts" in e
                and any(start <= e["ts"] <= end for start, end in spans))
    return syncs / len(spans)
