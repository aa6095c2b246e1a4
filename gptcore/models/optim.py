"""The optimizer and its learning-rate schedule, built the same way for training and for reading a
sharded checkpoint's state.

train.optimizer=adamw: AdamW on every parameter, weight decay on matrices only.
train.optimizer=muon: PyTorch's torch.optim.Muon on the blocks' matrices (attention and MLP), where
it orthogonalizes each update (Newton-Schulz, 5 iterations in bf16, or in fp32 on a device that has
no bf16 matmul in hardware: see Muon), and AdamW on the rest: the token
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


class Muon(torch.optim.Muon):
    """torch.optim.Muon with adjust_lr_fn="original". Its Newton-Schulz iterations are in bf16; with
    ORTHOGONALIZE_IN float32 (a device with no bf16 matmul in hardware), the same update has them in
    fp32. A CPU without AVX-512 BF16 or AMX emulates bf16 matmuls about 100x slower than fp32: the
    fast model's optimizer step took 976 ms against 40 ms on an AVX2 EPYC (BENCHMARKS.md)."""

    def __init__(self, params, orthogonalize_in: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.orthogonalize_in = orthogonalize_in

    @torch.no_grad()
    def step(self) -> None:
        if self.orthogonalize_in == torch.bfloat16:
            super().step()
            return
        for group in self.param_groups:  # torch.optim.Muon's single-tensor update (its only one)
            lr, momentum = float(group["lr"]), group["momentum"]
            for param in (p for p in group["params"] if p.grad is not None):
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.orthogonalize_in)
                param.mul_(1 - lr * group["weight_decay"])
                rows, cols = param.shape  # adjust_lr_fn="original": the update's RMS alike across shapes
                param.add_(update, alpha=-lr * math.sqrt(max(1, rows / cols)))


def orthogonalize(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration towards the nearest orthogonal matrix (torch.optim.Muon's
    own, in DTYPE), on the wide orientation so that the Gram matrix is the smaller one."""
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.to(dtype)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)  # a spectral norm of at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adamw(groups: list[dict], t: TrainConfig) -> torch.optim.AdamW:
    """The fused kernel when the device has one, which does the whole update in one pass."""
    kwargs = dict(lr=t.lr, betas=(t.beta1, t.beta2))
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def make_optimizer(model: torch.nn.Module, config: Config, orthogonalize_in: torch.dtype = torch.bfloat16):
    """AdamW (weight decay on matrices, not biases or norms), or Muon + AdamW (train.optimizer);
    Muon orthogonalizes in ORTHOGONALIZE_IN (float32 where bf16 matmuls are not in hardware)."""
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
    muon = Muon([p for p in params if id(p) in hidden], orthogonalize_in, lr=t.muon_lr, momentum=t.muon_momentum,
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
