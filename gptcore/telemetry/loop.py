"""What the training loop reports, as one component: its log lines and metrics records, the phase
timers, cProfile and torch.profiler windows, the hardware sampler and the hang watchdog.

The trainer calls it at four points: before a step, after a step, at a log step (the window's
line and record) and around the work that is not a step (eval, checkpoints), which the timers
count as their own phase, the profiler leaves out and the watchdog gives the full timeout.
"""

from __future__ import annotations

import math
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from gptcore.cluster import distributed
from gptcore.cluster.parallel import peak_memory
from gptcore.cluster.watchdog import Watchdog
from gptcore.config import Config, batch_split
from gptcore.data.corpus import bits_unit, describe
from gptcore.telemetry import hardware
from gptcore.telemetry.profiling import AllReduceTimer, LoopProfiler, PhaseTimer, TorchProfilerWindow
from gptcore.telemetry.sinks import open_run_log


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class StepClock:
    """Wall time of the steps since the last log line, and the session's pace for the ETA."""

    def __init__(self, step: int):
        self.session_start = self.window_start = time.perf_counter()
        self.session_first_step, self.window_steps = step, 0

    def lap(self, step: int, max_iters: int) -> tuple[float, int, float]:
        """(seconds of this window, steps in it, seconds left to max_iters); starts the next window."""
        now = time.perf_counter()
        elapsed, steps = now - self.window_start, self.window_steps
        eta = (now - self.session_start) / (step - self.session_first_step) * (max_iters - step)
        self.window_start, self.window_steps = now, 0
        return elapsed, steps, eta


def start_sampler(config: Config, out_dir: Path, contract: distributed.RankContract):
    """One hardware sampler per node: the node's first local rank runs it."""
    if not config.profile.sampler or contract.local_rank != 0:
        return None
    from gptcore.telemetry.sampler import Sampler

    return Sampler(out_dir / "samples", node_rank=contract.rank, interval=config.profile.sampler_interval,
                   world_size=contract.world_size).start()


class LoopTelemetry:
    """Everything the loop reports: log lines (through the trainer's `log`), metrics, phase timers,
    cProfile, the torch.profiler window, the sampler and the watchdog. `checkpointer` tells where
    the metrics resume (its saved step) and what a stuck rank keeps (its kept())."""

    def __init__(self, config: Config, out_dir: Path, contract: distributed.RankContract, device: torch.device,
                 start_step: int, checkpointer, comm: AllReduceTimer | None, log, flops_per_token: float,
                 peak_tflops: float | None):
        t, profile = config.train, config.profile
        self.config, self.contract, self.comm, self.log = config, contract, comm, log
        self.tokens_per_step = batch_split(config, contract.world_size)[1] * t.grad_accum * config.model.block_size
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops
        self.metrics = open_run_log(config, out_dir, contract.is_main, checkpointer.saved_step, device)
        self.timer = PhaseTimer(device, enabled=profile.phases)
        self.profiler = LoopProfiler(out_dir, contract.rank, profile.cprofile)
        self.trace = TorchProfilerWindow(out_dir, contract.rank, profile.torch_start, profile.torch_steps,
                                         profile.torch)
        self.sampler = start_sampler(config, out_dir, contract)
        self.watchdog = Watchdog(out_dir, contract.rank, t.timeout_s, t.step_timeout_s, checkpointer.kept)
        if contract.world_size > 1:
            self.watchdog.start()
        self.clock = StepClock(start_step)

    def record(self, record: dict) -> None:
        self.metrics.write({**record, "time": time.time()})

    @contextmanager
    def active(self):
        """cProfile on for the loop."""
        with self.profiler.active():
            yield

    @contextmanager
    def aside(self, phase: str):
        """Work between steps (eval, a checkpoint): its own phase, out of cProfile, and allowed the
        process group's full timeout."""
        with self.profiler.paused(), self.watchdog.longer(), self.timer.phase(phase):
            yield

    def before_step(self, step: int) -> None:
        if self.trace.acts(step):
            with self.profiler.paused():  # the trace's own start and export stay out of cProfile
                self.trace.before_step(step)

    def step_done(self, step: int) -> None:
        """Step `step` (counted from 0) is done."""
        self.timer.step_done()
        if self.comm:
            self.comm.step_done()
        if self.trace.acts(step):
            with self.profiler.paused():
                self.trace.after_step(step)
        self.clock.window_steps += 1
        self.watchdog.beat(step + 1)

    def window(self, step: int, step_loss: torch.Tensor, lr: float, memory: dict) -> float:
        """The log line and metrics record of the steps since the last one; the loss, averaged over ranks."""
        t, world_size = self.config.train, self.contract.world_size
        loss = distributed.all_reduce_mean(step_loss.float()).item()
        elapsed, steps, eta = self.clock.lap(step, t.max_iters)
        self.watchdog.window_done(elapsed)
        tokens_per_s = self.tokens_per_step * steps / elapsed
        mfu = hardware.mfu(tokens_per_s, self.flops_per_token, world_size, self.peak_tflops)
        peak = peak_memory(self.timer.device)
        self.log(f"step {step}/{t.max_iters} | loss {loss:.4f} | lr {lr:.2e} | {1000 * elapsed / steps:.1f} ms/step | "
                 f"{tokens_per_s:,.0f} tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")
                 + (f" | peak {peak['peak_memory_bytes'] / 2**30:.2f} GiB" if peak else "") + f" | ETA {format_eta(eta)}")
        comm = self.comm.drain() if self.comm else None
        self.record({"step": step, "loss": loss, "lr": lr, "ms_per_step": 1000 * elapsed / steps,
                     "tokens_per_s": tokens_per_s, **({"mfu": mfu} if mfu is not None else {}),
                     **({"comm": comm} if comm else {}), "memory": {**memory, **peak},
                     "world_size": world_size, "phases_ms": self.timer.drain()})
        return loss

    def evaluated(self, step: int, losses: dict[str, float], vocab) -> None:
        bpc = losses["val"] / math.log(2)
        self.log(f"eval step {step}: train {losses['train']:.4f} | val {losses['val']:.4f} | {bpc:.3f} "
                 f"{bits_unit(vocab)}")
        self.record({"step": step, "eval": True, "train_loss": losses["train"], "val_loss": losses["val"],
                     "val_bpc": bpc})

    def started(self, settings: str, model: str, threads, dtype_name: str, meta: dict, probe: dict | None) -> None:
        """The run's opening lines (its settings, threads, data, model, the all-reduce probe) and records."""
        self.log(settings)
        self.log(f"threads: {torch.get_num_threads()} per rank, {threads.reason()}")
        self.record({**threads.record(), "world_size": self.contract.world_size,
                     "parallel": self.config.train.parallel, "dtype": dtype_name, "host": socket.gethostname()})
        self.log(f"data: {describe(meta)}")
        self.log(model)
        if probe:
            self.record({"probe": "allreduce", **probe})
            self.log(distributed.describe_probe(probe))

    def close(self) -> None:
        self.watchdog.stop()
        self.trace.close()
        self.profiler.dump()
        if self.sampler:
            self.sampler.stop()
        self.metrics.close()
