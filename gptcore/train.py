"""The training loop: micro-steps, gradient accumulation, AdamW, warmup + cosine, eval, checkpoints.

    gptcore train --config cpu
    torchrun --nproc_per_node=4 -m gptcore train --config seed
    srun --ntasks=4 python -m gptcore train --config seed

One optimizer step draws a global batch of `batch_size * grad_accum` rows (`batch_size` per rank
under weak scaling). Each rank takes its slice of every micro-batch, so N ranks compute exactly
the update one rank would on the whole batch; DDP averages the gradients. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from gptcore import checkpoint, distributed
from gptcore.config import Config, write_yaml
from gptcore.data import Batches, Shard, describe, resolve_data
from gptcore.errors import LostRanks, TrainingFailure, UserInputError
from gptcore.model import GPT
from gptcore.profiling import LoopProfiler, PhaseTimer, TorchProfilerWindow

CHECKPOINT_NAME = "ckpt.pt"


def lr_at(step: int, config: Config) -> float:
    """Linear warmup to lr, then cosine decay to min_lr (lr/10 when unset) at max_iters."""
    t = config.train
    min_lr = t.min_lr or t.lr / 10
    if step < t.warmup_iters:
        return t.lr * (step + 1) / (t.warmup_iters + 1)
    span = max(1, t.max_iters - t.warmup_iters)
    progress = min(1.0, (step - t.warmup_iters) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - min_lr)


def batch_split(config: Config, world_size: int) -> tuple[int, int]:
    """(rows per rank per micro-step, rows per micro-step across all ranks)."""
    t = config.train
    if t.scaling == "weak":
        return t.batch_size, t.batch_size * world_size
    if t.batch_size % world_size:
        raise UserInputError(
            f"train.batch_size={t.batch_size} is the global batch under strong scaling and must divide "
            f"evenly over {world_size} ranks; use a multiple of {world_size} or train.scaling=weak")
    return t.batch_size // world_size, t.batch_size


def make_optimizer(model: torch.nn.Module, config: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms); the fused kernel when the
    device has one, which does the whole update in one pass over the parameters."""
    t = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    kwargs = dict(lr=t.lr, betas=(t.beta1, t.beta2))
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run in hardware (1.3-1.7x faster training here, see
    BENCHMARKS.md); elsewhere they are emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    choice = config.train.dtype
    if choice == "auto":
        if device.type == "cuda":
            wants_bf16 = torch.cuda.is_bf16_supported()
        else:
            wants_bf16 = cpu_has_native_bf16()
        return torch.bfloat16 if wants_bf16 else None
    return torch.bfloat16 if choice == "bfloat16" else None


class PreemptionFlag:
    """Set by SIGUSR1 (Slurm's `--signal=USR1@N` warning before the time limit or a preemption)
    or SIGUSR2 (submitit's); the loop checkpoints at the next step boundary, or the one after with
    several ranks, which agree on it in the background. The previous
    handlers come back afterwards, so a launcher's own handler (submitit's requeue) still runs."""

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
    import subprocess

    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"gptcore: scontrol requeue {job_id} failed: {result.stderr.strip()}", file=sys.stderr)
        return None
    return f"requeued Slurm job {job_id}"


@dataclass
class TrainResult:
    final_step: int
    train_loss: float
    val_loss: float | None
    preempted: bool
    out_dir: Path


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl that MetricsLog wrote."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserInputError(f"{path}:{number} is not valid JSON; was the run killed while writing?") from None
    return records


class MetricsLog:
    """metrics.jsonl, one JSON object per line, appended (a resumed run continues the file)."""

    def __init__(self, path: Path, enabled: bool):
        self.enabled = enabled
        self.handle = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self.enabled:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle:
            self.handle.close()


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Trainer:
    def __init__(self, config: Config, contract: distributed.RankContract | None = None):
        self.config = config
        self.contract = contract or distributed.read_contract()
        self.out_dir = Path(config.out_dir)
        self.ckpt_path = self.out_dir / CHECKPOINT_NAME
        self.is_main = self.contract.is_main

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    # -- set-up ---------------------------------------------------------------------------------

    def _check_out_dir(self) -> dict | None:
        """The checkpoint to resume from, if any; refuses to overwrite a run unless resume=auto."""
        if not self.ckpt_path.exists():
            return None
        if self.config.resume != "auto":
            raise UserInputError(
                f"{self.ckpt_path} already exists; pass resume=auto to continue that run or choose another out_dir")
        state = checkpoint.load(self.ckpt_path, checkpoint.FORMAT)
        return state

    def setup(self) -> None:
        config, contract = self.config, self.contract
        t = config.train
        if t.threads:
            torch.set_num_threads(t.threads)
        resume_state = self._check_out_dir()
        self.device = distributed.choose_device(contract, t.device)
        distributed.init_process_group(contract, self.device, t.timeout_s)
        if contract.world_size > 1:  # every rank, so a multi-node log shows where each one ran
            print(f"rank {contract.rank}/{contract.world_size} on {socket.gethostname()}", flush=True)
        # Here, not in the loop: the measured link feeds the scaling report's all-reduce model.
        self.probe = distributed.probe_allreduce(self.device) if contract.world_size > 1 else None
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            data_dir = resolve_data(config.data.path, config.data.clean, self.out_dir / "data")
        distributed.barrier()
        if not self.is_main:
            data_dir = resolve_data(config.data.path, config.data.clean, self.out_dir / "data")
        self.per_rank_batch, self.global_batch = batch_split(config, contract.world_size)
        self.batches = Batches(data_dir, config.model.block_size, t.seed,
                               Shard(contract.rank, contract.world_size))
        self.meta = self.batches.meta
        if resume_state and resume_state["vocab"] != self.meta["vocab"]:
            raise UserInputError(f"{self.ckpt_path} was trained on another vocabulary than {config.data.path}")
        config.model.vocab_size = self.meta["vocab_size"]

        torch.manual_seed(t.seed)  # same initial weights on every rank
        self.model = GPT(config.model).to(self.device)
        torch.manual_seed(t.seed + contract.rank)  # but different dropout masks per rank
        self.optimizer = make_optimizer(self.model, config, self.device)
        self.start_step, self.best_val = 0, float("inf")
        if resume_state:
            self._restore(resume_state)
        self.compute_model = torch.compile(self.model) if t.compile else self.model
        if contract.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.compute_model = DistributedDataParallel(self.compute_model, device_ids=device_ids)
        dtype = autocast_dtype(config, self.device)
        self.autocast = (torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext())
        self.dtype_name = str(dtype).replace("torch.", "") if dtype else "float32"
        if self.is_main:
            write_yaml(config, self.out_dir / "config.yaml")

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["data"])
        self.start_step = state["step"]
        self.best_val = state["best_val_loss"]
        rank_states = state["rng"]
        if self.contract.rank < len(rank_states):
            checkpoint.restore_rng_state(rank_states[self.contract.rank])
        self.log(f"resumed from {self.ckpt_path} at step {self.start_step}")

    # -- pieces of the loop ---------------------------------------------------------------------

    def _micro_steps(self, timer: PhaseTimer) -> torch.Tensor:
        accum = self.config.train.grad_accum
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            with timer.phase("data"):
                x, y = self.batches.next_train(self.global_batch)
                if self.device.type == "cuda":
                    x = x.pin_memory().to(self.device, non_blocking=True)
                    y = y.pin_memory().to(self.device, non_blocking=True)
            # Gradients are all-reduced once per optimizer step, on the last micro-step.
            last = micro == accum - 1
            sync = nullcontext() if last or not isinstance(self.compute_model, DistributedDataParallel) \
                else self.compute_model.no_sync()
            with sync:
                with timer.phase("forward"), self.autocast:
                    _, loss = self.compute_model(x, y)
                    loss = loss / accum
                with timer.phase("backward"):
                    loss.backward()
            total += loss.detach()
        return total

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        t = self.config.train
        self.model.eval()
        losses = {}
        for split in ("train", "val"):
            total = torch.zeros((), device=self.device)
            for x, y in self.batches.eval_batches(split, t.eval_iters, self.global_batch):
                with self.autocast:
                    _, loss = self.model(x.to(self.device), y.to(self.device))
                total += loss.float()
            losses[split] = distributed.all_reduce_mean(total / t.eval_iters).item()
        self.model.train()
        return losses

    def save_checkpoint(self, step: int) -> None:
        own = checkpoint.rng_state()
        gathered = distributed.gather_tensors(own["torch"].to(self.device))
        if not self.is_main:
            return
        rng = [{**own, "torch": state.cpu()} for state in gathered]
        checkpoint.save({
            "format": checkpoint.FORMAT,
            "version": checkpoint.FORMAT_VERSION,
            "step": step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "data": self.batches.state_dict(),
            "rng": rng,
            "best_val_loss": self.best_val,
            "world_size": self.contract.world_size,
            "config": self.config.to_dict(),
            "vocab": self.meta["vocab"],
        }, self.ckpt_path)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        self.setup()
        try:
            return self._loop()
        except RuntimeError as err:
            if self.contract.world_size == 1 or not distributed.lost_peer(err):
                raise
            # gloo's message: "[source file:line] Read error [addr]:port: Connection reset by peer. Advice..."
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            detail = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]
            kept = f"{self.ckpt_path} is kept" if self.ckpt_path.exists() else "no checkpoint was written yet"
            raise LostRanks(
                f"rank {self.contract.rank} lost the other ranks ({detail}): one of them or its node has "
                f"died, see their logs; {kept}, and a rerun with resume=auto continues from it") from None
        finally:
            distributed.shutdown()

    def _loop(self) -> TrainResult:
        config, t = self.config, self.config.train
        contract = self.contract
        tokens_per_step = self.global_batch * t.grad_accum * config.model.block_size
        self.log(
            f"world_size={contract.world_size} launcher={contract.launcher} device={self.device} "
            f"dtype={self.dtype_name} backend={'nccl' if self.device.type == 'cuda' else 'gloo' if contract.world_size > 1 else 'none'}")
        self.log(f"data: {describe(self.meta)}")
        self.log(f"model: {self.model.num_params() / 1e6:.2f}M parameters, "
                 f"global batch {self.global_batch * t.grad_accum} x {config.model.block_size} tokens")
        metrics = MetricsLog(self.out_dir / "metrics.jsonl", self.is_main)
        if self.probe:
            metrics.write({"probe": "allreduce", **self.probe, "time": time.time()})
            self.log(f"all-reduce probe: {self.probe['bytes'] / 2**20:.0f} MiB over {self.probe['nodes']} node(s) "
                     f"in {1000 * self.probe['seconds']:.2f} ms, bus bandwidth {self.probe['busbw_gbps']:.2f} GB/s, "
                     f"latency {self.probe['latency_us']:.0f} us")
        timer = PhaseTimer(self.device, enabled=config.profile.phases)
        profiler = LoopProfiler(self.out_dir, contract.rank, config.profile.cprofile)
        trace = TorchProfilerWindow(self.out_dir, contract.rank, config.profile.torch_start,
                                    config.profile.torch_steps, config.profile.torch)
        sampler = start_sampler(config, self.out_dir, contract)
        ckpt_every = t.ckpt_interval or t.eval_interval
        step, loss_value, val_loss, preempted = self.start_step, float("nan"), None, False
        end = min(t.stop_at, t.max_iters) if t.stop_at else t.max_iters
        diverged = torch.zeros((), dtype=torch.bool, device=self.device)
        last_good_step = self.start_step if self.ckpt_path.exists() else None
        window_start, window_steps = time.perf_counter(), 0
        run_start_step, run_start = step, time.perf_counter()

        def checkpoint_now(at_step: int) -> None:
            nonlocal last_good_step
            if distributed.any_rank(bool(diverged.item()), self.device):
                raise self._diverged(at_step, last_good_step)
            with timer.phase("checkpoint"):
                self.save_checkpoint(at_step)
            last_good_step = at_step

        # One step late, so that no rank waits on the others at every step boundary.
        preemption_vote = distributed.LaggedVote()
        try:
            with PreemptionFlag() as preemption, profiler.active():
                while step < end:
                    with profiler.paused():  # the trace's own start and export stay out of cProfile
                        trace.before_step(step)
                    lr = lr_at(step, config)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    step_loss = self._micro_steps(timer)
                    with timer.phase("optimizer"):
                        if t.grad_clip > 0:
                            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    diverged |= ~torch.isfinite(step_loss)
                    timer.step_done()
                    with profiler.paused():
                        trace.after_step(step)
                    step += 1
                    window_steps += 1

                    if step % t.log_interval == 0 or step == end:
                        loss_value = distributed.all_reduce_mean(step_loss.float()).item()
                        if not math.isfinite(loss_value):
                            raise self._diverged(step, last_good_step)
                        elapsed = time.perf_counter() - window_start
                        ms = 1000 * elapsed / window_steps
                        tps = tokens_per_step * window_steps / elapsed
                        eta = (time.perf_counter() - run_start) / (step - run_start_step) * (t.max_iters - step)
                        phases = timer.drain()
                        self.log(f"step {step}/{t.max_iters} | loss {loss_value:.4f} | lr {lr:.2e} | "
                                 f"{ms:.1f} ms/step | {tps:,.0f} tok/s | ETA {format_eta(eta)}")
                        metrics.write({"step": step, "loss": loss_value, "lr": lr, "ms_per_step": ms,
                                       "tokens_per_s": tps, "world_size": contract.world_size,
                                       "phases_ms": phases, "time": time.time()})
                        window_start, window_steps = time.perf_counter(), 0

                    if step % t.eval_interval == 0 or step == t.max_iters:
                        with profiler.paused(), timer.phase("eval"):
                            losses = self.evaluate()
                        val_loss = losses["val"]
                        self.best_val = min(self.best_val, val_loss)
                        bpc = val_loss / math.log(2)
                        self.log(f"eval step {step}: train {losses['train']:.4f} | val {val_loss:.4f} | "
                                 f"{bpc:.3f} bits/char")
                        metrics.write({"step": step, "eval": True, "train_loss": losses["train"],
                                       "val_loss": val_loss, "val_bpc": bpc, "time": time.time()})
                    if step % ckpt_every == 0 or step == end:
                        with profiler.paused():
                            checkpoint_now(step)
                    if step < t.max_iters and preemption_vote(preemption.raised):
                        with profiler.paused():
                            checkpoint_now(step)
                        preempted = True
                        self.log(f"preemption signal: checkpoint saved at step {step}/{t.max_iters}")
                        break
            preemption_vote.close()
        finally:
            trace.close()
            profiler.dump()
            if sampler:
                sampler.stop()
            metrics.close()
        distributed.barrier()
        if preempted and t.requeue and self.is_main and (requeued := requeue_slurm_job()):
            self.log(f"{requeued}; it resumes from {self.ckpt_path}")
        return TrainResult(step, loss_value, val_loss, preempted, self.out_dir)

    def _diverged(self, step: int, last_good_step: int | None) -> TrainingFailure:
        kept = (f"the last good checkpoint ({self.ckpt_path}, step {last_good_step}) is kept"
                if last_good_step is not None else "no checkpoint was written")
        return TrainingFailure(
            f"loss became NaN/inf by step {step}; {kept}; lower train.lr or raise train.warmup_iters")


def start_sampler(config: Config, out_dir: Path, contract: distributed.RankContract):
    """One hardware sampler per node: the node's first local rank runs it."""
    if not config.profile.sampler or contract.local_rank != 0:
        return None
    from gptcore.sampler import Sampler

    return Sampler(out_dir / "samples", node_rank=contract.rank, interval=config.profile.sampler_interval,
                   world_size=contract.world_size).start()


def train(config: Config) -> TrainResult:
    return Trainer(config).run()
