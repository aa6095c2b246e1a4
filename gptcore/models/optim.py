"""The optimizer and its learning-rate schedule, built the same way for training and for reading a
sharded checkpoint's state.

train.optimizer=adamw: AdamW on every parameter, weight decay on matrices only.
train.optimizer=muon: PyTorch's torch.optim.Muon on the blocks' matrices (attention and MLP), where
it orthogonalizes each update (Newton-Schulz, 5 bf16 iterations), and AdamW on the rest: the token
and position embeddings, an untied head, norms and biases. Muon is meant for hidden matrices only;
an embedding's rows are looked up one at a time and the head's outputs are scored one by one, so
orthogonalizing their updates does not fit them (modded-nanogpt keeps them on Adam too).
"""

from __future__ import annotations

import math

import torch

from gptcore.config import Config, TrainConfig


class MuonAdamW:
    """Muon and AdamW over disjoint parameters, stepped, zeroed, saved and restored as one optimizer."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.parts = {"muon": muon, "adamw": adamw}

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts.values() for group in part.param_groups]

    @property
    def state(self) -> dict:
        return {**self.parts["muon"].state, **self.parts["adamw"].state}

    def step(self) -> None:
        for part in self.parts.values():
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts.values():
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != set(self.parts):
            raise ValueError("the optimizer state is not a Muon + AdamW state")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


def adamw(groups: list[dict], t: TrainConfig) -> torch.optim.AdamW:
    """The fused kernel when the device has one, which does the whole update in one pass."""
    kwargs = dict(lr=t.lr, betas=(t.beta1, t.beta2))
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def make_optimizer(model: torch.nn.Module, config: Config):
    """AdamW (weight decay on matrices, not biases or norms), or Muon + AdamW (train.optimizer)."""
    t = config.train
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = set()
    if t.optimizer == "muon":
        hidden = {id(p) for p in model.transformer.h.parameters() if p.requires_grad and p.dim() == 2}
    rest = [p for p in params if id(p) not in hidden]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": t.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    if not hidden:
        return adamw(groups, t)
    muon = torch.optim.Muon([p for p in params if id(p) in hidden], lr=t.muon_lr, momentum=t.muon_momentum,
                            weight_decay=t.muon_weight_decay, nesterov=True, adjust_lr_fn="original")
    return MuonAdamW(muon, adamw(groups, t))


def lr_factor(step: int, t: TrainConfig) -> float:
    """The learning rate at `step` as a fraction of the peak. Linear warmup, then
    cosine: decay to min_lr (lr/10 when unset) at max_iters; or
    wsd: hold the peak, then decay linearly to min_lr over the last decay_frac of max_iters."""
    floor = (t.min_lr or t.lr / 10) / t.lr
    if step < t.warmup_iters:
        return (step + 1) / (t.warmup_iters + 1)
    if t.schedule == "wsd":
        decay_start = max(t.warmup_iters, t.max_iters * (1 - t.decay_frac))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1.0, t.max_iters - decay_start))
        return 1.0 - progress * (1.0 - floor)
    progress = min(1.0, (step - t.warmup_iters) / max(1, t.max_iters - t.warmup_iters))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)


def set_lr(optimizer, factor: float, t: TrainConfig) -> None:
    """Every group at `factor` of its own peak: train.lr for AdamW's, train.muon_lr for Muon's."""
    peaks = {"muon": t.muon_lr, "adamw": t.lr}
    parts = optimizer.parts if isinstance(optimizer, MuonAdamW) else {"adamw": optimizer}
    for name, part in parts.items():
        for group in part.param_groups:
            group["lr"] = factor * peaks[name]
