"""The training loop: steps (training.step), eval, checkpoints and stops, over what training.parts composed.

    gptcore train --config cpu
    torchrun --nproc_per_node=4 -m gptcore train --config seed
    srun --ntasks=4 python -m gptcore train --config seed

One optimizer step draws a global batch of `batch_size * grad_accum` rows (`batch_size` per rank
under weak scaling). Each rank takes its slice of every micro-batch, so N ranks compute exactly
the update one rank would on the whole batch; DDP averages the gradients. Only rank 0 writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from gptcore.cluster import distributed, preemption
from gptcore.config import Config
from gptcore.training.evaluation import evaluate
from gptcore.training.parts import Parts, compose
from gptcore.training.rundir import RunLock
from gptcore.training.step import train_step


@dataclass
class TrainResult:
    start_step: int  # where this session began: max_iters when resume=auto found the run complete
    final_step: int
    train_loss: float
    val_loss: float | None
    best_val: float
    preempted: bool
    stray_sigterm: bool  # stopped by a late SIGTERM of the job's run before its requeue (rank 0 asked Slurm)
    out_dir: Path
    checkpoint: Path
    device: torch.device
    vocab: list[str] | str


class Trainer:
    """One training on this rank: compose() builds its parts (training.parts), loop() runs the steps
    (training.step) and hands everything it reports to a LoopTelemetry (telemetry.loop)."""

    def __init__(self, config: Config, contract: distributed.RankContract | None = None):
        self.config = config
        self.contract = contract or distributed.read_contract()
        self.lock = RunLock(Path(config.out_dir))
        self.parts: Parts | None = None

    def log(self, message: str) -> None:
        if self.contract.is_main:
            print(message, flush=True)

    def run(self) -> TrainResult:
        with preemption.catching():
            try:
                self.parts = compose(self.config, self.contract, self.lock, self.log)
                return self.loop(self.parts)
            except RuntimeError as err:
                if self.contract.world_size == 1 or not distributed.lost_peer(err):
                    raise
                checkpointer = self.parts.checkpointer if self.parts else None
                kept = checkpointer.kept() if checkpointer else "no checkpoint was written"
                saved = checkpointer is not None and checkpointer.saved_step is not None
                raise distributed.lost_ranks(err, self.contract.rank, kept, saved) from None
            finally:
                distributed.shutdown()
                self.lock.release()

    def loop(self, p: Parts) -> TrainResult:
        t, step = self.config.train, p.start_step
        telemetry = p.telemetry()
        loss_value, val_loss, stopped_by = float("nan"), None, None
        end = min(t.stop_at, t.max_iters) if t.stop_at else t.max_iters
        diverged = torch.zeros((), dtype=torch.bool, device=p.device)
        preemption_vote = distributed.LaggedVote()  # one step late: no rank waits on the others at every step
        preemption.FLAG.phase = "loop"  # a signal from here on stops at an agreed step
        try:
            with telemetry.active():
                while step < end:
                    telemetry.before_step(step)
                    step_loss, lr, finite = train_step(p, step, telemetry.timer)
                    diverged |= ~finite
                    telemetry.step_done(step)
                    step += 1
                    if step % t.log_interval == 0 or step == end:
                        loss_value = telemetry.window(step, step_loss, lr, p.memory)
                        if not math.isfinite(loss_value):
                            raise p.diverged(step)
                    if step % t.eval_interval == 0 or step == t.max_iters:
                        with telemetry.aside("eval"):
                            losses = evaluate(p.model, p.batches, t.eval_iters, p.global_batch, p.autocast)
                            p.best_val, val_loss = min(p.best_val, losses["val"]), losses["val"]
                            telemetry.evaluated(step, losses, p.batches.meta["vocab"])
                    stopping = step < t.max_iters and preemption.FLAG.agree(preemption_vote(preemption.FLAG.code))
                    if (t.ckpt_interval and step % t.ckpt_interval == 0) or step == end or stopping:
                        with telemetry.aside("checkpoint"):
                            p.save(step, diverged)
                    if stopping:
                        stopped_by = preemption.FLAG.name
                        break
            preemption_vote.close()
            with telemetry.watchdog.longer():
                p.checkpointer.wait()
        finally:
            preemption.FLAG.phase = "done"
            telemetry.close()
        # Whether a SIGTERM was a stray one: rank 0 asks Slurm and every rank takes its answer, so that
        # they resume or stop together. Before the barrier, which keeps this collective's work to be
        # freed by this thread (distributed.barrier).
        stray = bool(stopped_by) and distributed.any_rank(
            self.contract.is_main and preemption.stray_sigterm(stopped_by), p.device)
        distributed.barrier()
        if stopped_by:
            self.log(f"stopped by {stopped_by} at step {step}/{t.max_iters}: checkpoint {p.checkpointer.path} saved; "
                     "a rerun with resume=auto continues from it")
            requeue = preemption.FLAG.requeues and t.requeue
            if self.contract.is_main and (requeued := preemption.tell_slurm(requeue, stray)):
                self.log(f"{requeued}; it resumes from {p.checkpointer.path}")
        return TrainResult(p.start_step, step, loss_value, val_loss, p.best_val, stopped_by is not None, stray,
                           Path(self.config.out_dir), p.checkpointer.path, p.device, p.batches.meta["vocab"])


def train(config: Config) -> TrainResult:
    return Trainer(config).run()
