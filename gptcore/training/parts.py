"""What one rank trains with, composed once before its first step: the rank's threads, device and
process group (training.setup), the checkpointer it may resume from (checkpointing), the data, the
model as parallelize wrapped it (DDP or FSDP2), the optimizer and the numerics. The loop
(training.train) takes these parts; train_step (training.step) and save() are what it calls on them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gptcore.checkpointing.sharded import checkpointer_for
from gptcore.cluster import distributed, preemption
from gptcore.cluster.parallel import Parallel, parallelize
from gptcore.config import Config, batch_split, write_yaml
from gptcore.data.batches import Batches
from gptcore.errors import TrainingFailure, UserInputError
from gptcore.models.gpt import GPT
from gptcore.models.optim import make_optimizer
from gptcore.telemetry import hardware
from gptcore.telemetry.loop import LoopTelemetry
from gptcore.telemetry.profiling import AllReduceTimer
from gptcore.telemetry.sinks import check_sinks
from gptcore.training.evaluation import still_finite
from gptcore.training.rundir import RunLock, claim, move_aside
from gptcore.training.setup import (EARLIER_RUN_FILES, autocast_context, autocast_dtype, build_model, check_memory,
                                    compiles, describe_model, describe_settings, load_batches, start_rank, starting_weights)


@dataclass
class Parts:
    config: Config
    contract: distributed.RankContract
    log: Callable[[str], None]
    threads: distributed.Threads
    device: torch.device
    checkpointer: object  # checkpoint.Checkpointer or sharded.ShardedCheckpointer: one file, or DCP shards
    batches: Batches
    global_batch: int  # rows of one micro-step over all ranks
    model: GPT
    parallel: Parallel
    optimizer: torch.optim.Optimizer
    comm: AllReduceTimer | None  # profile.comm's timing of DDP's all-reduce
    probe: dict | None  # the link measured at start, for the scaling report's all-reduce model
    autocast: object
    dtype_name: str
    peak_tflops: float | None
    start_step: int = 0
    best_val: float = float("inf")
    memory: dict | None = None  # the training state's bytes, measured after the first optimizer step

    def telemetry(self) -> LoopTelemetry:
        telemetry = LoopTelemetry(self.config, Path(self.config.out_dir), self.contract, self.device, self.start_step,
                                  self.checkpointer, self.comm, self.log, self.model.flops_per_token(),
                                  self.peak_tflops)
        telemetry.started(describe_settings(self.config, self.contract, self.device, self.dtype_name),
                          describe_model(self.config, self.model, self.global_batch, self.device, self.peak_tflops),
                          self.threads, self.dtype_name, self.batches.meta, self.probe)
        return telemetry

    def save(self, step: int, diverged: torch.Tensor) -> None:
        """Save at `step`, unless the weights went bad since the last save (then keep that one and stop)."""
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


def compose(config: Config, contract: distributed.RankContract, lock: RunLock, log: Callable[[str], None]) -> Parts:
    """Everything a rank needs, in an order that lets every rank refuse early and together."""
    t = config.train
    out_dir = Path(config.out_dir)
    # A stop signal in set-up ends a set-up stuck in C++ within this bound (preemption.SetUpGuard).
    preemption.FLAG.grace_s = min(preemption.GRACE_S, t.timeout_s / 2)
    check_sinks(config)
    threads, device = start_rank(config, contract)
    # One training per directory: every rank learns whether rank 0 got it before anything is read.
    refused = claim(lock, log) if contract.is_main else None
    if distributed.any_rank(refused is not None, device):
        raise refused or UserInputError(f"rank 0 could not take {out_dir}; see its log")
    checkpointer = checkpointer_for(config, out_dir, device, contract.rank)
    resume_state = checkpointer.existing(config)
    start = None if resume_state else starting_weights(config, log)  # a resumed fine-tuning run continues
    if not resume_state and contract.is_main and (moved := move_aside(out_dir, EARLIER_RUN_FILES)):
        log(f"moved the files of an earlier run without a checkpoint to {moved}")
    # Here, not in the loop: the measured link feeds the scaling report's all-reduce model.
    probe = distributed.probe_allreduce(device) if contract.world_size > 1 else None
    per_rank_batch, global_batch = batch_split(config, contract.world_size)
    batches = load_batches(config, contract, device, out_dir, resume_state, start)
    check_memory(config, per_rank_batch, device, contract.world_size)
    model = build_model(config, device, start, contract.rank)
    dtype = autocast_dtype(config, device)
    comm = AllReduceTimer(device) if config.profile.comm and t.parallel == "ddp" else None
    parallel = parallelize(model, device, t.parallel, compiles(config, device), dtype, t.reshard_after_forward,
                           t.activation_checkpointing, comm.hook if comm else None)
    optimizer = make_optimizer(model, config,  # over the parameters as parallelize left them
                               torch.bfloat16 if hardware.has_native_bf16(device) else torch.float32)
    parts = Parts(config, contract, log, threads, device, checkpointer, batches, global_batch, model, parallel,
                  optimizer, comm, probe, autocast_context(dtype, device),
                  str(dtype).replace("torch.", "") if dtype else "float32",
                  t.peak_tflops or hardware.peak_tflops(hardware.device_name(device), dtype, tf32=not t.deterministic))
    if resume_state:
        parts.start_step, parts.best_val = checkpointer.restore(resume_state, model, optimizer, batches)
        log(f"resumed from {checkpointer.path} at step {parts.start_step}")
    if contract.is_main:
        write_yaml(config, out_dir / "config.yaml")
    return parts
