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
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from gptcore.checkpointing.sharded import checkpointer_for
from gptcore.cluster import distributed, preemption
from gptcore.cluster.parallel import describe_memory, parallelize, state_bytes
from gptcore.cluster.preemption import requeue_slurm_job
from gptcore.config import Config, batch_split, write_yaml
from gptcore.errors import TrainingFailure, UserInputError
from gptcore.models.optim import lr_factor, make_optimizer, set_lr
from gptcore.telemetry import hardware
from gptcore.telemetry.loop import LoopTelemetry
from gptcore.telemetry.profiling import AllReduceTimer, PhaseTimer
from gptcore.telemetry.sinks import check_sinks
from gptcore.training.evaluation import evaluate, still_finite
from gptcore.training.rundir import RunLock, claim, move_aside
from gptcore.training.setup import (EARLIER_RUN_FILES, autocast_dtype, build_model, check_memory, compiles,
                                    describe_model, describe_settings, load_batches, start_rank, starting_weights)


@dataclass
class TrainResult:
    final_step: int
    train_loss: float
    val_loss: float | None
    preempted: bool
    out_dir: Path


class Trainer:
    """One training on this rank. setup() composes its parts: the rank's threads, device and process
    group (training.setup), the checkpointer (checkpointing), the data, the model as parallelize
    wrapped it (DDP or FSDP2) and the optimizer. loop() runs the steps and hands everything it
    reports to a LoopTelemetry (telemetry.loop)."""

    def __init__(self, config: Config, contract: distributed.RankContract | None = None):
        self.config = config
        self.contract = contract or distributed.read_contract()
        self.out_dir = Path(config.out_dir)
        self.is_main = self.contract.is_main
        self.lock = RunLock(self.out_dir)

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def setup(self) -> None:
        config, contract, t = self.config, self.contract, self.config.train
        # A stop signal in set-up ends a set-up stuck in C++ within this bound (preemption.SetUpGuard).
        preemption.FLAG.grace_s = min(preemption.GRACE_S, t.timeout_s / 2)
        check_sinks(config)
        self.threads, self.device = start_rank(config, contract)
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
        self.batches = load_batches(config, contract, self.device, self.out_dir, resume_state, start)
        check_memory(config, self.per_rank_batch, self.device, contract.world_size)
        self.model = build_model(config, self.device, start, contract.rank)
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
        self.autocast = torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()
        self.dtype_name = str(dtype).replace("torch.", "") if dtype else "float32"
        self.peak_tflops = t.peak_tflops or hardware.peak_tflops(
            hardware.device_name(self.device), dtype, tf32=not t.deterministic)
        if self.is_main:
            write_yaml(config, self.out_dir / "config.yaml")

    def train_step(self, step: int, timer: PhaseTimer) -> tuple[torch.Tensor, float, torch.Tensor]:
        """One optimizer step at `step`'s learning rate: (its loss, AdamW's lr, whether the gradients
        were finite), all left on the device."""
        t = self.config.train
        factor = lr_factor(step, t)
        set_lr(self.optimizer, factor, t)
        step_loss = torch.zeros((), device=self.device)
        for micro in range(t.grad_accum):
            with timer.phase("data"):
                x, y = self.batches.next_train(self.global_batch)
            # Gradients are reduced across ranks once per optimizer step, on the last micro-step.
            with self.parallel.gradient_sync(micro == t.grad_accum - 1):
                with timer.phase("forward"), self.autocast:
                    _, loss = self.parallel.compute_model(x, y)
                    loss = loss / t.grad_accum
                with timer.phase("backward"):
                    loss.backward()
            step_loss += loss.detach()
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

    def run(self) -> TrainResult:
        with preemption.catching():
            try:
                self.setup()
                return self.loop()
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

    def loop(self) -> TrainResult:
        t, step = self.config.train, self.start_step
        telemetry = self.start_telemetry()
        loss_value, val_loss, stopped_by = float("nan"), None, None
        end = min(t.stop_at, t.max_iters) if t.stop_at else t.max_iters
        diverged = torch.zeros((), dtype=torch.bool, device=self.device)
        preemption_vote = distributed.LaggedVote()  # one step late: no rank waits on the others at every step
        preemption.FLAG.phase = "loop"  # a signal from here on stops at an agreed step
        try:
            with telemetry.active():
                while step < end:
                    telemetry.before_step(step)
                    step_loss, lr, finite = self.train_step(step, telemetry.timer)
                    diverged |= ~finite
                    telemetry.step_done(step)
                    step += 1
                    if step % t.log_interval == 0 or step == end:
                        loss_value = telemetry.window(step, step_loss, lr, self.memory)
                        if not math.isfinite(loss_value):
                            raise self.diverged(step)
                    if step % t.eval_interval == 0 or step == t.max_iters:
                        with telemetry.aside("eval"):
                            losses = evaluate(self.model, self.batches, t.eval_iters, self.global_batch, self.autocast)
                            self.best_val, val_loss = min(self.best_val, losses["val"]), losses["val"]
                            telemetry.evaluated(step, losses, self.batches.meta["vocab"])
                    if (t.ckpt_interval and step % t.ckpt_interval == 0) or step == end:
                        self.checkpoint(step, diverged, telemetry)
                    if step < t.max_iters and preemption.FLAG.agree(preemption_vote(preemption.FLAG.code)):
                        self.checkpoint(step, diverged, telemetry)
                        stopped_by = preemption.FLAG.name
                        break
            preemption_vote.close()
            with telemetry.watchdog.longer():
                self.checkpointer.wait()
        finally:
            preemption.FLAG.phase = "done"
            telemetry.close()
        distributed.barrier()
        if stopped_by:
            self.log(f"stopped by {stopped_by} at step {step}/{t.max_iters}: checkpoint {self.checkpointer.path} saved; "
                     "a rerun with resume=auto continues from it")
            if preemption.FLAG.requeues and t.requeue and self.is_main and (requeued := requeue_slurm_job()):
                self.log(f"{requeued}; it resumes from {self.checkpointer.path}")
        return TrainResult(step, loss_value, val_loss, stopped_by is not None, self.out_dir)

    def start_telemetry(self) -> LoopTelemetry:
        telemetry = LoopTelemetry(self.config, self.out_dir, self.contract, self.device, self.start_step,
                                  self.checkpointer, self.comm, self.log, self.model.flops_per_token(), self.peak_tflops)
        telemetry.started(describe_settings(self.config, self.contract, self.device, self.dtype_name),
                          describe_model(self.config, self.model, self.global_batch, self.device, self.peak_tflops),
                          self.threads, self.dtype_name, self.batches.meta, self.probe)
        return telemetry

    def checkpoint(self, step: int, diverged: torch.Tensor, telemetry: LoopTelemetry) -> None:
        """Save at `step`, unless the weights went bad since the last save (then keep that one and stop)."""
        with telemetry.aside("checkpoint"):
            probe = next(self.batches.eval_batches("train", 1, self.global_batch))
            if distributed.any_rank(bool(diverged.item()) or not still_finite(self.model, *probe, self.autocast),
                                    self.device):
                raise self.diverged(step)
            self.checkpointer.save(step, self.model, self.optimizer, self.batches, config=self.config.to_dict(),
                                   vocab=self.batches.meta["vocab"], world_size=self.contract.world_size,
                                   best_val_loss=self.best_val)

    def diverged(self, step: int) -> TrainingFailure:
        return TrainingFailure(f"loss or weights became NaN/inf by step {step}; {self.checkpointer.kept()} (the last "
                               "good one); lower train.lr or raise train.warmup_iters")


def train(config: Config) -> TrainResult:
    return Trainer(config).run()
