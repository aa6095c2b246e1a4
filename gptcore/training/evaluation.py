"""Losses measured outside the optimizer steps: the fixed batches of eval_interval, a full
deterministic pass over a split, and the finiteness check before a checkpoint is written."""

from __future__ import annotations

import torch

from gptcore.cluster import distributed
from gptcore.cluster.parallel import local
from gptcore.data.batches import Batches


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
