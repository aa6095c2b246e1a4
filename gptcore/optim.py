"""The optimizer: AdamW, built the same way for training and for reading a sharded checkpoint's state."""

from __future__ import annotations

import torch

from gptcore.config import Config


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.AdamW:
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
