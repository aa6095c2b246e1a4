"""The training loop: micro-steps, gradient accumulation, the optimizer and its schedule, eval, checkpoints.

    gptcore train --config cpu
    torchrun --nproc_per_node=4 -m gptcore train --config seed
    srun --ntasks=4 python -m gptcore train --config seed

One optimizer step draws a global batch of `batch_size * grad_accum` rows (`batch_size` per rank
under weak scaling). Each rank takes its slice of every micro-batch, so N ranks compute exactly
the update one rank would on the whole batch; DDP averages the gradients. Only rank 0 writes.
"""

from __future__ import annotations

import math
import os
import socket
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from gptcore.checkpointing import checkpoint
from gptcore.checkpointing.checkpoint import check_header_fits_file
from gptcore.checkpointing.sharded import checkpointer_for
from gptcore.cluster import distributed, preemption
from gptcore.cluster.parallel import describe_memory, estimated_memory, local, parallelize, peak_memory, state_bytes
from gptcore.cluster.preemption import requeue_slurm_job
from gptcore.cluster.watchdog import Watchdog
from gptcore.config import ARCHITECTURE_KEYS, Config, batch_split, config_from_dict, resume_conflicts, write_yaml
from gptcore.data.batches import Batches, Shard
from gptcore.data.corpus import bits_unit, describe, tokenizer_for, vocabulary_name
from gptcore.data.prepare import resolve_data
from gptcore.errors import TrainingFailure, UserInputError, shown
from gptcore.models.gpt import GPT, parameter_count
from gptcore.models.optim import lr_factor, make_optimizer, set_lr
from gptcore.telemetry import hardware
from gptcore.telemetry.profiling import AllReduceTimer, LoopProfiler, PhaseTimer, TorchProfilerWindow
from gptcore.telemetry.sinks import RunLog, check_sinks, open_run_log
from gptcore.training.rundir import RunLock, claim, move_aside

# What a run writes into its directory besides its checkpoints; a fresh run moves an earlier one's aside.
EARLIER_RUN_FILES = ("metrics.jsonl", "config.yaml", "samples", "profile", "hang", "tb", "wandb", "wandb_run_id")


def autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device does bf16 in hardware (`auto`), never emulated; there is no
    fp16 path, so no loss scaling is needed. None: plain fp32."""
    choice = config.train.dtype
    if choice == "auto":
        native = hardware.cuda_has_native_bf16() if device.type == "cuda" else hardware.cpu_has_native_bf16()
        return torch.bfloat16 if native else None
    return torch.bfloat16 if choice == "bfloat16" else None


def compiles(config: Config, device: torch.device) -> bool:
    """torch.compile on CUDA by default (nanoGPT: ~1.8x per iteration); on the CPU it did not pay
    at our shapes (BENCHMARKS.md), so there only when asked."""
    choice = config.train.compile
    return device.type == "cuda" if choice == "auto" else choice == "true"


def compile_scope(config: Config, device: torch.device) -> str:
    """What torch.compile covers, for the start line: the whole model, each block (fsdp), or nothing."""
    if not compiles(config, device):
        return "off"
    return "per block (fsdp: the root runs eager)" if config.train.parallel == "fsdp" else "on"


def set_numerics(deterministic: bool, device: torch.device) -> None:
    """train.deterministic: kernels that give the same bits on every run (PyTorch's deterministic
    algorithms, cuBLAS's fixed workspace, no cuDNN or memory-efficient attention, whose backward
    passes accumulate in a varying order) and plain fp32 matmuls. Otherwise TF32 for fp32 matmuls
    on GPUs that have it."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True)
        torch.set_float32_matmul_precision("highest")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cuda.enable_cudnn_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
    else:
        torch.set_float32_matmul_precision("high")


def check_memory(config: Config, rows_per_rank: int, device: torch.device, world_size: int = 1) -> None:
    """Refuse, before allocating, a model and batch that cannot fit the device's memory
    (parallel.estimated_memory: the training state and one micro-batch's activations)."""
    m, t = config.model, config.train
    state, activations = estimated_memory(m, rows_per_rank, t.parallel, world_size, t.activation_checkpointing)
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else psutil.virtual_memory().total)
    if state + activations > total:
        raise UserInputError(
            f"this model and batch need about {(state + activations) / 1e9:,.1f} GB per rank ({state / 1e9:,.1f} GB "
            f"for {parameter_count(m):,} parameters with their gradients and AdamW state under {t.parallel}, "
            f"{activations / 1e9:,.1f} GB for one micro-batch of {rows_per_rank} x {m.block_size} tokens), more than "
            f"the {total / 1e9:,.1f} GB of {hardware.device_name(device)}; lower train.batch_size (raise "
            "train.grad_accum to keep the batch), model.block_size or the model's size, or shard the state over "
            "the ranks: train.parallel=fsdp")


@torch.no_grad()
def still_finite(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, autocast) -> bool:
    """Whether weights about to be saved are finite and still give a finite loss on a fixed batch:
    a huge step can leave every weight finite but the model useless (inf activations)."""
    model.eval()  # no dropout: no draw from the generators that training uses
    with autocast:
        _, loss = model(x, y)
    model.train()
    finite = torch.stack([torch.isfinite(local(p)).all() for p in model.parameters()]).all()
    return bool(finite & torch.isfinite(loss))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Batches, iters: int, rows: int, autocast) -> dict[str, float]:
    """Mean loss on `iters` fixed batches of each split, over all ranks (collective)."""
    model.eval()
    losses = {}
    for split in ("train", "val"):
        total = torch.zeros((), device=batches.device)
        for x, y in batches.eval_batches(split, iters, rows):
            with autocast:
                _, loss = model(x, y)
            total += loss.float()
        losses[split] = distributed.all_reduce_mean(total / iters).item()
    model.train()
    return losses


@torch.no_grad()
def evaluate_full(model: torch.nn.Module, batches: Batches, split: str, rows: int, autocast) -> float:
    """Mean loss per token over every window of a split (Batches.full_pass), over all ranks
    (collective): the deterministic measure that time-to-loss comparisons need."""
    model.eval()
    total = torch.zeros((), device=batches.device, dtype=torch.float64)
    count = torch.zeros((), device=batches.device, dtype=torch.float64)
    for x, y in batches.full_pass(split, rows):
        with autocast:
            _, loss = model(x, y)
        total += loss.double() * y.numel()
        count += y.numel()
    model.train()
    total, count = distributed.all_reduce_mean(torch.stack((total, count))).tolist()  # the ratio of the sums
    return total / count


@dataclass
class TrainResult:
    final_step: int
    train_loss: float
    val_loss: float | None
    preempted: bool
    out_dir: Path


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


class Trainer:
    def __init__(self, config: Config, contract: distributed.RankContract | None = None):
        self.config = config
        self.contract = contract or distributed.read_contract()
        self.out_dir = Path(config.out_dir)
        self.is_main = self.contract.is_main
        self.lock = RunLock(self.out_dir)

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    # -- set-up ---------------------------------------------------------------------------------

    def setup(self) -> None:
        config, contract = self.config, self.contract
        t = config.train
        # A stop signal in set-up ends a set-up stuck in C++ within this bound (preemption.SetUpGuard).
        preemption.FLAG.grace_s = min(preemption.GRACE_S, t.timeout_s / 2)
        check_sinks(config)
        self.threads = distributed.thread_share(t.threads, t.cpu_ranks, contract)
        torch.set_num_threads(self.threads.count)
        self.device = distributed.choose_device(contract, t.device)
        set_numerics(t.deterministic, self.device)
        distributed.preflight(contract, cuda_devices=torch.cuda.device_count() if self.device.type == "cuda" else 0)
        distributed.init_process_group(contract, self.device, t.timeout_s, str(self.out_dir),
                                       t.single_rank_group or t.parallel == "fsdp")  # FSDP shards over a group
        if contract.world_size > 1:  # every rank, so a multi-node log shows where each one ran
            print(f"rank {contract.rank}/{contract.world_size} on {socket.gethostname()}: "
                  f"{torch.get_num_threads()} thread(s), {self.threads.reason()}", flush=True)
        # One training per directory: every rank learns whether rank 0 got it before anything is read.
        refused = claim(self.lock, self.log) if self.is_main else None
        if distributed.any_rank(refused is not None, self.device):
            raise refused or UserInputError(f"rank 0 could not take {self.out_dir}; see its log")
        self.checkpointer = checkpointer_for(config, self.out_dir, self.device, contract.rank)
        resume_state = self.checkpointer.existing(config)
        start = None if resume_state else starting_weights(config, self.log)  # a resumed fine-tuning run continues
        if not resume_state and self.is_main and (moved := move_aside(self.out_dir, EARLIER_RUN_FILES)):
            self.log(f"moved the files of an earlier run without a checkpoint to {moved}")
        # Here, not in the loop: the measured link feeds the scaling report's all-reduce model.
        self.probe = distributed.probe_allreduce(self.device) if contract.world_size > 1 else None
        self.per_rank_batch, self.global_batch = batch_split(config, contract.world_size)
        vocab, owner = data_vocabulary(config, resume_state, start)
        data_dir = distributed.rank0_first(
            lambda: resolve_data(config.data.path, config.data.clean, self.out_dir / "data", vocab, owner))
        self.batches = Batches(data_dir, config.model.block_size, t.seed, Shard(contract.rank, contract.world_size),
                               self.device)
        config.model.vocab_size = self.batches.meta["vocab_size"]
        check_memory(config, self.per_rank_batch, self.device, contract.world_size)
        torch.manual_seed(t.seed)  # same initial weights on every rank
        self.model = GPT(config.model).to(self.device)
        if start:
            self.model.load_state_dict(start["model"])
        torch.manual_seed(t.seed + contract.rank)  # but different dropout masks per rank
        dtype = autocast_dtype(config, self.device)
        self.comm = AllReduceTimer(self.device) if config.profile.comm and t.parallel == "ddp" else None
        self.parallel = parallelize(self.model, self.device, t.parallel, compiles(config, self.device), dtype,
                                    t.reshard_after_forward, t.activation_checkpointing,
                                    self.comm.hook if self.comm else None)
        self.optimizer = make_optimizer(self.model, config)  # over the parameters as parallelize left them
        self.start_step, self.best_val, self.memory = 0, float("inf"), None
        if resume_state:
            self.start_step, self.best_val = self.checkpointer.restore(resume_state, self.model, self.optimizer,
                                                                       self.batches)
            self.log(f"resumed from {self.checkpointer.path} at step {self.start_step}")
        self.autocast = (torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext())
        self.dtype_name = str(dtype).replace("torch.", "") if dtype else "float32"
        self.peak_tflops = t.peak_tflops or hardware.peak_tflops(
            hardware.device_name(self.device), dtype, tf32=not t.deterministic)
        if self.is_main:
            write_yaml(config, self.out_dir / "config.yaml")

    # -- pieces of the loop ---------------------------------------------------------------------

    def train_step(self, step: int, timer: PhaseTimer) -> tuple[torch.Tensor, float, torch.Tensor]:
        """One optimizer step at `step`'s learning rate: (its loss, AdamW's lr, whether the gradients
        were finite), all left on the device."""
        t = self.config.train
        factor = lr_factor(step, t)
        set_lr(self.optimizer, factor, t)
        step_loss = self._micro_steps(timer)
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        with timer.phase("optimizer"):
            if t.grad_clip > 0:
                finite = torch.isfinite(self.parallel.clip_gradients(t.grad_clip))
            self.optimizer.step()
            if self.memory is None:  # the first step: gradients and the optimizer's state exist now
                self.memory = state_bytes(self.model, self.optimizer)
                self.log(describe_memory(self.memory))
            self.optimizer.zero_grad(set_to_none=True)
        return step_loss, factor * t.lr, finite & torch.isfinite(step_loss)

    def _micro_steps(self, timer: PhaseTimer) -> torch.Tensor:
        accum = self.config.train.grad_accum
        total = torch.zeros((), device=self.device)
        for micro in range(accum):
            with timer.phase("data"):
                x, y = self.batches.next_train(self.global_batch)
            # Gradients are reduced across ranks once per optimizer step, on the last micro-step.
            with self.parallel.gradient_sync(micro == accum - 1):
                with timer.phase("forward"), self.autocast:
                    _, loss = self.parallel.compute_model(x, y)
                    loss = loss / accum
                with timer.phase("backward"):
                    loss.backward()
            total += loss.detach()
        return total

    def _log_window(self, step: int, step_loss: torch.Tensor, lr: float, timer: PhaseTimer,
                    clock: StepClock, metrics: RunLog, watchdog: Watchdog) -> float:
        """The log line and metrics record of the steps since the last one; the loss, averaged over ranks."""
        t, contract = self.config.train, self.contract
        loss = distributed.all_reduce_mean(step_loss.float()).item()
        elapsed, steps, eta = clock.lap(step, t.max_iters)
        watchdog.window_done(elapsed)
        tokens_per_s = self.global_batch * t.grad_accum * self.config.model.block_size * steps / elapsed
        mfu = hardware.mfu(tokens_per_s, self.model.flops_per_token(), contract.world_size, self.peak_tflops)
        peak = peak_memory(self.device)
        self.log(f"step {step}/{t.max_iters} | loss {loss:.4f} | lr {lr:.2e} | {1000 * elapsed / steps:.1f} ms/step | "
                 f"{tokens_per_s:,.0f} tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else "")
                 + (f" | peak {peak['peak_memory_bytes'] / 2**30:.2f} GiB" if peak else "") + f" | ETA {format_eta(eta)}")
        comm = self.comm.drain() if self.comm else None
        metrics.write({"step": step, "loss": loss, "lr": lr, "ms_per_step": 1000 * elapsed / steps,
                       "tokens_per_s": tokens_per_s, **({"mfu": mfu} if mfu is not None else {}),
                       **({"comm": comm} if comm else {}), "memory": {**self.memory, **peak},
                       "world_size": contract.world_size, "phases_ms": timer.drain(), "time": time.time()})
        return loss

    def _evaluate_and_log(self, step: int, metrics: RunLog) -> float:
        losses = evaluate(self.model, self.batches, self.config.train.eval_iters, self.global_batch, self.autocast)
        self.best_val = min(self.best_val, losses["val"])
        bpc = losses["val"] / math.log(2)
        self.log(f"eval step {step}: train {losses['train']:.4f} | val {losses['val']:.4f} | {bpc:.3f} "
                 f"{bits_unit(self.batches.meta['vocab'])}")
        metrics.write({"step": step, "eval": True, "train_loss": losses["train"], "val_loss": losses["val"],
                       "val_bpc": bpc, "time": time.time()})
        return losses["val"]

    def _log_start(self, metrics: RunLog) -> None:
        t = self.config.train
        self.log(f"world_size={self.contract.world_size} launcher={self.contract.launcher} device={self.device} "
                 f"parallel={t.parallel} optimizer={t.optimizer} schedule={t.schedule} "
                 f"dtype={self.dtype_name} backend={distributed.backend_name()} "
                 f"compile={compile_scope(self.config, self.device)} "
                 f"deterministic={'on' if t.deterministic else 'off'}")
        self.log(f"threads: {torch.get_num_threads()} per rank, {self.threads.reason()}")
        metrics.write({**self.threads.record(), "world_size": self.contract.world_size, "parallel": t.parallel,
                       "dtype": self.dtype_name,
                       "host": socket.gethostname(), "time": time.time()})
        self.log(f"data: {describe(self.batches.meta)}")
        peak = f", peak {self.peak_tflops:g} TFLOP/s per device" if self.peak_tflops else ""
        self.log(f"model: {self.model.num_params() / 1e6:.2f}M parameters, "
                 f"global batch {self.global_batch * t.grad_accum} x {self.config.model.block_size} tokens, "
                 f"{hardware.device_name(self.device)}{peak}")
        if self.probe:
            metrics.write({"probe": "allreduce", **self.probe, "time": time.time()})
            self.log(distributed.describe_probe(self.probe))

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        with preemption.catching():
            try:
                self.setup()
                return self._loop()
            except RuntimeError as err:
                if self.contract.world_size == 1 or not distributed.lost_peer(err):
                    raise
                checkpointer = getattr(self, "checkpointer", None)
                kept = checkpointer.kept() if checkpointer else "no checkpoint was written"
                saved = checkpointer is not None and checkpointer.saved_step is not None
                raise distributed.lost_ranks(err, self.contract.rank, kept, saved) from None
            finally:
                distributed.shutdown()
                self.lock.release()

    def _loop(self) -> TrainResult:
        config, t = self.config, self.config.train
        metrics = open_run_log(config, self.out_dir, self.is_main, self.checkpointer.saved_step, self.device)
        self._log_start(metrics)
        timer = PhaseTimer(self.device, enabled=config.profile.phases)
        profiler = LoopProfiler(self.out_dir, self.contract.rank, config.profile.cprofile)
        trace = TorchProfilerWindow(self.out_dir, self.contract.rank, config.profile.torch_start,
                                    config.profile.torch_steps, config.profile.torch)
        sampler = start_sampler(config, self.out_dir, self.contract)
        watchdog = Watchdog(self.out_dir, self.contract.rank, t.timeout_s, t.step_timeout_s, self.checkpointer.kept)
        if self.contract.world_size > 1:
            watchdog.start()
        step, loss_value, val_loss, stopped_by = self.start_step, float("nan"), None, None
        end = min(t.stop_at, t.max_iters) if t.stop_at else t.max_iters
        diverged = torch.zeros((), dtype=torch.bool, device=self.device)
        clock = StepClock(step)

        def checkpoint_now(at_step: int) -> None:
            with profiler.paused(), watchdog.longer(), timer.phase("checkpoint"):
                probe = next(self.batches.eval_batches("train", 1, self.global_batch))
                if distributed.any_rank(bool(diverged.item()) or not still_finite(self.model, *probe, self.autocast),
                                        self.device):
                    raise self._diverged(at_step)
                self.checkpointer.save(at_step, self.model, self.optimizer, self.batches, config=config.to_dict(),
                                       vocab=self.batches.meta["vocab"], world_size=self.contract.world_size,
                                       best_val_loss=self.best_val)

        # One step late, so that no rank waits on the others at every step boundary.
        preemption_vote = distributed.LaggedVote()
        preemption.FLAG.phase = "loop"  # a signal from here on stops at an agreed step
        try:
            with profiler.active():
                while step < end:
                    with profiler.paused():  # the trace's own start and export stay out of cProfile
                        trace.before_step(step)
                    step_loss, lr, finite = self.train_step(step, timer)
                    diverged |= ~finite
                    timer.step_done()
                    if self.comm:
                        self.comm.step_done()
                    with profiler.paused():
                        trace.after_step(step)
                    step += 1
                    clock.window_steps += 1
                    watchdog.beat(step)
                    if step % t.log_interval == 0 or step == end:
                        loss_value = self._log_window(step, step_loss, lr, timer, clock, metrics, watchdog)
                        if not math.isfinite(loss_value):
                            raise self._diverged(step)
                    if step % t.eval_interval == 0 or step == t.max_iters:
                        with profiler.paused(), watchdog.longer(), timer.phase("eval"):
                            val_loss = self._evaluate_and_log(step, metrics)
                    if (t.ckpt_interval and step % t.ckpt_interval == 0) or step == end:
                        checkpoint_now(step)
                    if step < t.max_iters and preemption_vote(preemption.FLAG.raised):
                        checkpoint_now(step)
                        stopped_by = preemption.FLAG.name or "a signal on another rank"
                        break
            preemption_vote.close()
            with watchdog.longer():
                self.checkpointer.wait()
        finally:
            preemption.FLAG.phase = "done"
            watchdog.stop()
            trace.close()
            profiler.dump()
            if sampler:
                sampler.stop()
            metrics.close()
        distributed.barrier()
        if stopped_by:
            self.log(f"stopped by {stopped_by} at step {step}/{t.max_iters}: checkpoint {self.checkpointer.path} saved; "
                     "a rerun with resume=auto continues from it")
            if preemption.FLAG.requeues and t.requeue and self.is_main and (requeued := requeue_slurm_job()):
                self.log(f"{requeued}; it resumes from {self.checkpointer.path}")
        return TrainResult(step, loss_value, val_loss, stopped_by is not None, self.out_dir)

    def _diverged(self, step: int) -> TrainingFailure:
        return TrainingFailure(f"loss or weights became NaN/inf by step {step}; {self.checkpointer.kept()} (the last "
                               "good one); lower train.lr or raise train.warmup_iters")


def data_vocabulary(config: Config, resume_state: dict | None, start: dict | None) -> tuple[list[str] | str | None, str]:
    """The vocabulary the run's data must be encoded with (None: the text's own characters), and
    whose it is, for a refusal: a checkpoint's wins over data.vocab."""
    if resume_state:
        return resume_state["vocab"], "the checkpoint being resumed"
    if start:
        return start["vocab"], f"the checkpoint being fine-tuned (train.init_from {config.train.init_from})"
    return ("bytes" if config.data.vocab == "bytes" else None), "data.vocab=bytes"


def starting_weights(config: Config, log) -> dict | None:
    """train.init_from: the weights and vocabulary to start from, the checkpoint's model shape put
    into config.model. A model key that the run set to another value is refused: it could not
    load those weights."""
    path = Path(config.train.init_from) if config.train.init_from else None
    if path is None:
        return None
    state = checkpoint.load(path)
    if state["format"] != checkpoint.FORMAT:
        raise UserInputError(f"train.init_from {path} is {shown(state.get('mode'))}-quantized; start from the fp32 "
                             "ckpt.pt of `gptcore train` or `gptcore import`")
    saved = config_from_dict(state["config"], f"the config in {path}")
    if asked := [c for c in resume_conflicts(saved, config, ARCHITECTURE_KEYS) if c.split("=")[0] in config.given_keys]:
        raise UserInputError(f"train.init_from {path} holds another model ({', '.join(asked)}); drop those model.* "
                             "settings: a fine-tuning run takes the checkpoint's shape")
    for key in ARCHITECTURE_KEYS:
        setattr(config.model, key.split(".")[1], getattr(saved.model, key.split(".")[1]))
    check_header_fits_file(saved, "fp32", path.stat().st_size, path)
    try:
        tokenizer_for(state["vocab"], saved.model.vocab_size)
        model = GPT(saved.model, init_weights=False)
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise UserInputError(f"train.init_from {path} is damaged or from another version "
                             f"({checkpoint.one_line(err, 160)})") from None
    if bad := checkpoint.first_non_finite(state["model"]):
        raise UserInputError(f"train.init_from {path} holds NaN or infinite weights ({bad}); start from an earlier "
                             "checkpoint")
    log(f"starting from the weights of {path} ({saved.model.n_layer} layers x {saved.model.n_embd}, "
        f"{vocabulary_name(state['vocab'])}), with a fresh optimizer and schedule")
    return {"model": model.state_dict(), "vocab": state["vocab"]}


def start_sampler(config: Config, out_dir: Path, contract: distributed.RankContract):
    """One hardware sampler per node: the node's first local rank runs it."""
    if not config.profile.sampler or contract.local_rank != 0:
        return None
    from gptcore.telemetry.sampler import Sampler

    return Sampler(out_dir / "samples", node_rank=contract.rank, interval=config.profile.sampler_interval,
                   world_size=contract.world_size).start()


def train(config: Config) -> TrainResult:
    return Trainer(config).run()
