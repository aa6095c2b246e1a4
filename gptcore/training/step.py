"""One optimizer step: the learning rate for the step, `grad_accum` micro-steps whose gradients are
reduced across ranks only on the last, clipping (which also says whether the gradients were finite)
and the optimizer's update."""

from __future__ import annotations

import torch

from gptcore.cluster.parallel import describe_memory, state_bytes
from gptcore.models.optim import lr_factor, set_lr
from gptcore.telemetry.profiling import PhaseTimer
from gptcore.training.parts import Parts


def train_step(p: Parts, step: int, timer: PhaseTimer) -> tuple[torch.Tensor, float, torch.Tensor]:
    """One optimizer step at `step`'s learning rate: (its loss, AdamW's lr, whether the gradients
    were finite), all left on the device so that no step waits for it."""
    t = p.config.train
    factor = lr_factor(step, t)
    set_lr(p.optimizer, factor, t)
    step_loss = torch.zeros((), device=p.device)
    for micro in range(t.grad_accum):
        with timer.phase("data"):
            x, y = p.batches.next_train(p.global_batch)
        with p.parallel.gradient_sync(micro == t.grad_accum - 1):
            with timer.phase("forward"), p.autocast:
                _, loss = p.parallel.compute_model(x, y)
                loss = loss / t.grad_accum
            with timer.phase("backward"):
                loss.backward()
        step_loss += loss.detach()
    finite = torch.ones((), dtype=torch.bool, device=p.device)
    with timer.phase("optimizer"):
        if t.grad_clip > 0:
            finite = torch.isfinite(p.parallel.clip_gradients(t.grad_clip))
        p.optimizer.step()
        if p.memory is None:  # the first step: gradients and the optimizer's state exist now
            p.memory = state_bytes(p.model, p.optimizer)
            p.log(describe_memory(p.memory))
        p.optimizer.zero_grad(set_to_none=True)
    return step_loss, factor * t.lr, finite & torch.isfinite(step_loss)
