"""The layout of a model's weight matrices for decoding on the CPU.

A batch-1 decode step multiplies one row by every weight matrix in turn, reading each matrix from
memory once per token: for all but the smallest models, that reading is the step. nn.Linear keeps
its weight row-major, [out, in], and computes x @ weight.T. Measured on an AMD EPYC with PyTorch's
MKL build, the same product runs faster once the weights outgrow the caches when the weight is
stored column-major (the [in, out] transpose contiguous, seen as the same [out, in] tensor):
1.1-1.3x the tokens/s at the seed and shakespeare_char shapes, and the same at small shapes, whose
weights sit in cache (BENCHMARKS.md, "Decode: the weights' layout"). The numbers differ from the
row-major product's in the last bits only: the sum runs in another order.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn


def column_major_linears(model: nn.Module) -> nn.Module:
    """The model, changed in place: each fp32 nn.Linear weight on the CPU stored column-major.
    A weight shared with another module (a head tied to the token embedding, whose rows the
    lookup reads) keeps its layout, as does any weight already column-major."""
    uses = Counter(id(parameter) for _, parameter in model.named_parameters(remove_duplicate=False))
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (type(module) is nn.Linear and weight.device.type == "cpu" and weight.dtype == torch.float32
                and uses[id(weight)] == 1 and weight.is_contiguous()):
            module.weight = nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=weight.requires_grad)
    return model
