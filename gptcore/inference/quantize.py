"""Post-training weight-only quantization: an fp32 checkpoint -> int8, int4 or bf16.

    gptcore quantize --ckpt runs/cpu/ckpt.pt --mode int8 --out runs/cpu/ckpt_int8.pt
    gptcore quantize --ckpt runs/cpu/ckpt.pt --mode int4 --group-size 64 --out runs/cpu/ckpt_int4.pt
    gptcore quantize --ckpt runs/cpu/ckpt.pt --mode bf16 --out runs/cpu/ckpt_bf16.pt   # GPU inference
    gptcore sample --ckpt runs/cpu/ckpt_int8.pt      # sample and eval take any of them directly

What is stored, per weight of the fp32 model:
- the attention and MLP matrices: int8 with one scale per output channel (symmetric, max|w| -> 127),
  or int4 with a bf16 scale and zero per group of `group_size` inputs (asymmetric min/max over 16
  levels, w = (q - 8) * scale + zero: gpt-fast's scheme, which the int4 kernel computes);
- the token and position embeddings: int8 per row in both modes. A lookup reads rows, and the
  token embedding is also the (tied) LM head, so its rows are the head's output channels: one
  int8 tensor serves both. They are ~1% of the weights, so int4 would save little;
- an untied head (model.tie_head=false): int8 per output channel in both modes, as the table it
  would otherwise share (the int4 kernel also needs a vocabulary divisible by 16);
- LayerNorm and RMSNorm weights and biases: fp32 (a few KB).
The file is a plain dict (torch.load weights_only=True) that describes itself: format, version,
mode, group_size (0 when there are no groups), config, vocab, and "model", the tensors named after
the fp32 weight they replace (`transformer.h.0.mlp.c_fc.weight.int4` / `.scales` / `.zeros`).
Loading checks every name, shape and dtype against what quantizing a model of that config gives
(worked out from the model's shapes, so a header that disagrees with the data is one clear error), and
that no scale, zero or norm is NaN or infinite; bytes damaged on disk fail the CRC-32 check that
every gptcore checkpoint gets on load (gptcore.checkpointing.checkpoint.damaged_record).

Kernels, chosen by measurement (bench/bench_quantize.py --variants: batch-1 decode with the KV
cache at the seed shape, 200 new tokens, 1 thread, 2-core AVX-512 AMD EPYC VM, torch 2.13.0+cpu;
tokens/s, median of 3):
    fp32 weights 140 | int8 _weight_int8pack_mm 327 | int4 _weight_int4pack_mm_for_cpu (g64) 452
    the same kernels on fp32 activations: int8 54, int4 26 (a slow fallback: hence bf16 inputs)
    dequantize the whole matrix in forward: int8 53, int4 20 | bf16 weights 193
    torchao 0.18 (pip-installable): int8 59 / int4 25 on an fp32 model, 144 / 371 on a bf16 one
So int8 runs torch._weight_int8pack_mm and int4 torch.ops.aten._weight_int4pack_mm_for_cpu on the
layout made by _convert_weight_to_int4pack_for_cpu (as gpt-fast does), both on bf16 activations.
torchao's CPU int4 is that same kernel behind a tensor subclass, and its int8 converts the whole
weight to float on every call: it was never faster, so it is not a dependency. At the small cpu
config (0.8M parameters, the weights fit in cache) decode is bound by per-op overhead and int8 /
int4 are ~0.8x fp32 there. The kernels are CPU kernels: for a GPU, export bf16.
"""

from __future__ import annotations

import io

import torch
import torch.nn as nn

from gptcore.checkpointing import checkpoint
from gptcore.config import ModelConfig, config_from_dict
from gptcore.data.corpus import tokenizer_for
from gptcore.errors import UserInputError, shown
from gptcore.models.gpt import GPT

FORMAT = "gptcore-quantized"
FORMAT_VERSION = 2  # 2: bf16 files keep their LayerNorms in fp32
MODES = ("int8", "int4", "bf16")
CPU_ONLY_MODES = ("int8", "int4")  # their kernels are PyTorch's CPU kernels
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel accepts
EMBEDDINGS = ("transformer.wte.weight", "transformer.wpe.weight")
TIED_HEAD = "lm_head.weight"  # the token embedding when tied (model.tie_head): stored once


# ---------------------------------------------------------------------------------------------
# The arithmetic: pure functions on tensors (they also run on the meta device)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> int8 (out, in) and one bf16 scale per output channel (the dtype the
    kernel multiplies in; quantizing against the rounded scale keeps the pair self-consistent)."""
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
    q = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float -> packed int4 (out, in / 2) uint8, bf16 scales and zeros (out, in / group)."""
    groups = weight.reshape(weight.size(0), -1, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-6).to(torch.bfloat16)
    zeros = (low + 8 * scales.float()).to(torch.bfloat16)
    q = (groups - zeros.float()[..., None]) / scales.float()[..., None] + 8
    q = q.round().clamp(0, 15).to(torch.uint8).reshape(weight.shape)
    return pack_int4(q), scales, zeros


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(packed)
    groups = q.reshape(q.size(0), scales.size(1), -1).float()
    return ((groups - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(q.shape)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte, even columns in the low nibble: a portable layout (the kernel's
    own layout depends on the CPU and is built at load time)."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.size(0), -1)


def quantize_weights(weights: dict[str, torch.Tensor], mode: str, group_size: int,
                     tied_head: bool = True) -> dict[str, torch.Tensor]:
    """An fp32 model state dict -> the tensors a quantized checkpoint stores. An untied head is
    a matrix like the blocks' (int8 or int4)."""
    out = {}
    for name, tensor in weights.items():
        if name == TIED_HEAD and tied_head:
            continue
        tensor = tensor.float()
        if mode == "bf16":
            # The norms stay fp32 (a few KB): gptcore.models.gpt.LayerNorm computes in fp32 anyway.
            out[name] = tensor if is_norm(name) else tensor.to(torch.bfloat16)
        elif tensor.dim() == 2 and (mode == "int8" or name in (*EMBEDDINGS, TIED_HEAD)):
            out[name + ".int8"], out[name + ".scales"] = quantize_int8(tensor)
        elif tensor.dim() == 2:
            out[name + ".int4"], out[name + ".scales"], out[name + ".zeros"] = quantize_int4(tensor, group_size)
        else:
            out[name] = tensor
    return out


def is_norm(name: str) -> bool:
    """A LayerNorm's weight or bias: `transformer.h.0.ln_1.weight`, `transformer.ln_f.bias`."""
    return name.rsplit(".", 2)[-2].startswith("ln_")


def int4_problem(model: ModelConfig, group_size: int) -> str | None:
    """Why int4 with this group size cannot quantize this model, or None. Every matrix reads
    n_embd or 4 * n_embd inputs, so a group size that divides n_embd divides them all."""
    fits = [g for g in INT4_GROUP_SIZES if model.n_embd % g == 0]
    if group_size in fits:
        return None
    hint = f"use {' or '.join(map(str, fits))}" if fits else "use --mode int8"
    if group_size not in INT4_GROUP_SIZES:
        return f"group size {group_size} is not one the int4 CPU kernel takes ({', '.join(map(str, INT4_GROUP_SIZES))}); {hint}"
    return f"group size {group_size} does not divide n_embd {model.n_embd} (the input width of every layer); {hint}"


# ---------------------------------------------------------------------------------------------
# Modules that compute with the stored tensors


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W quantized. The CPU kernels are fast only on bf16 activations (on fp32
    ones they fall back to code 6-17x slower at decode, 20-60x at evaluation), so the input is
    rounded to bf16 and the output brought back to the model's dtype: on the cpu-config model
    that moved val loss by less than 0.01%."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise UserInputError("int8 and int4 checkpoints run on the CPU (--device cpu); for a GPU, "
                                 "export one with `gptcore quantize --mode bf16`")
        y = self.matmul(x.reshape(-1, x.size(-1)).to(torch.bfloat16)).to(x.dtype).view(*x.shape[:-1], -1)
        return y + self.bias if self.bias is not None else y


class Int8Linear(QuantizedLinear):
    """int8 weights with one scale per output channel, dequantized inside the matmul."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, self.weight_int8, self.scales)


class Int4Linear(QuantizedLinear):
    """int4 weights in groups along the input; the kernel's packed layout and its (groups, out, 2)
    scale-and-zero table are built once, here."""

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.group_size = packed.size(1) * 2 // scales.size(1)
        q = unpack_int4(packed).to(torch.int32)
        self.register_buffer("weight_int4pack", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8))
        self.register_buffer("scales_and_zeros", torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous())
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight_int4pack, self.group_size,
                                                          self.scales_and_zeros)


class Int8Embedding(nn.Module):
    """Row lookup in an int8 table with one scale per row."""

    def __init__(self, weight_int8: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scales", scales)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[idx].float() * self.scales[idx].float().unsqueeze(-1)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def check_group_size(mode: str, group_size: int, model: ModelConfig) -> None:
    if mode == "int4" and (problem := int4_problem(model, group_size)):
        raise UserInputError(f"--group-size: {problem}")


def quantized_checkpoint(state: dict, mode: str, group_size: int) -> dict:
    """A trainer checkpoint -> a self-describing quantized checkpoint (no optimizer state)."""
    tied_head = config_from_dict(state["config"]).model.tie_head
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "mode": mode,
        "group_size": group_size if mode == "int4" else 0,
        "source_step": int(state.get("step", 0)),
        "config": state["config"],
        "vocab": state["vocab"],
        "model": quantize_weights(state["model"], mode, group_size, tied_head),
    }


def fp32_model_checkpoint(state: dict) -> dict:
    """The weights-only fp32 checkpoint that quantized sizes are compared with (a trainer
    checkpoint also holds the optimizer state, about twice the weights)."""
    return {"format": checkpoint.FORMAT, "version": checkpoint.FORMAT_VERSION, "config": state["config"],
            "vocab": state["vocab"], "model": state["model"]}


def serialized_size(state: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


def expected_layout(weights: dict[str, torch.Tensor], model: ModelConfig, mode: str,
                    group_size: int) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a checkpoint of this config and mode must hold:
    what quantize_weights stores for the fp32 state dict `weights`, from the shapes alone."""
    layout = {}
    for name, tensor in weights.items():
        if name == TIED_HEAD and model.tie_head:
            continue
        shape = tensor.shape
        if mode == "bf16":
            layout[name] = (shape, torch.float32 if is_norm(name) else torch.bfloat16)
        elif tensor.dim() == 2 and (mode == "int8" or name in (*EMBEDDINGS, TIED_HEAD)):
            layout[name + ".int8"], layout[name + ".scales"] = (shape, torch.int8), (shape[:1], torch.bfloat16)
        elif tensor.dim() == 2:
            groups = torch.Size((shape[0], shape[1] // group_size))
            layout[name + ".int4"] = (torch.Size((shape[0], shape[1] // 2)), torch.uint8)
            layout[name + ".scales"] = layout[name + ".zeros"] = (groups, torch.bfloat16)
        else:
            layout[name] = (shape, torch.float32)
    return layout


def check_header(state: dict, model: ModelConfig) -> tuple[str, int]:
    """The mode and group size, after checking the header is one this version can read. Raises
    ValueError with one line: load_model adds the path and how to fix it."""
    for key in ("version", "mode", "group_size", "model", "vocab"):
        if key not in state:
            raise ValueError(f"the header has no {key!r}")
    if state["version"] != FORMAT_VERSION:
        raise ValueError(f"format version {shown(state['version'])}, this gptcore reads version {FORMAT_VERSION}")
    mode, group_size = state["mode"], state["group_size"]
    if mode not in MODES:
        raise ValueError(f"unknown mode {shown(mode)} (expected one of {', '.join(MODES)})")
    if not isinstance(group_size, int) or (mode == "int4") != (group_size > 0):
        raise ValueError(f"group_size {shown(group_size)} does not fit mode {mode}")
    if mode == "int4" and (problem := int4_problem(model, group_size)):
        raise ValueError(problem)
    tokenizer_for(state["vocab"], model.vocab_size)  # characters or bytes, of the model's size
    return mode, group_size


def check_tensors(weights: dict, expected: dict, mode: str, group_size: int) -> None:
    where = f"mode {mode}" + (f", group size {group_size}" if group_size else "")
    if not isinstance(weights, dict):
        raise ValueError("'model' is not a dict of tensors")
    missing = [name for name in expected if name not in weights]
    if missing:
        raise ValueError(f"{len(missing)} tensors missing for {where}, first {missing[0]}")
    extra = [name for name in weights if name not in expected]
    if extra:
        raise ValueError(f"{len(extra)} unexpected tensors for {where}, first {extra[0]}")
    for name, (shape, dtype) in expected.items():
        tensor = weights[name]
        if not isinstance(tensor, torch.Tensor) or tensor.shape != shape or tensor.dtype != dtype:
            found = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} is {found}, expected {tuple(shape)} {dtype} for {where}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{name} holds NaN or infinite values")


def model_from_quantized(state: dict, config) -> tuple[GPT, str]:
    """The GPT a quantized checkpoint describes, ready for inference, and its mode."""
    if state["format"] != FORMAT:
        raise ValueError(f"unknown checkpoint format {shown(state['format'])}")
    mode, group_size = check_header(state, config.model)
    weights = state["model"]
    # Built on the CPU: its size is bounded by the file's (load_model has checked the header
    # against it), and the meta device's first use costs a second of imports.
    model = GPT(config.model, init_weights=False)
    check_tensors(weights, expected_layout(model.state_dict(), config.model, mode, group_size), mode, group_size)
    tied = config.model.tie_head
    if mode == "bf16":
        model.load_state_dict({**weights, TIED_HEAD: weights["transformer.wte.weight"]} if tied else weights,
                              assign=True)
        if tied:
            model.lm_head.weight = model.transformer.wte.weight
        return model.eval(), mode
    for name, module in list(model.named_modules()):
        key = f"{name}.weight"
        bias = weights.get(f"{name}.bias")
        if f"{key}.int4" in weights:
            new = Int4Linear(weights[f"{key}.int4"], weights[f"{key}.scales"], weights[f"{key}.zeros"], bias)
        elif f"{key}.int8" in weights and isinstance(module, nn.Embedding):
            new = Int8Embedding(weights[f"{key}.int8"], weights[f"{key}.scales"])
        elif f"{key}.int8" in weights:
            new = Int8Linear(weights[f"{key}.int8"], weights[f"{key}.scales"], bias)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    if tied:
        wte = model.transformer.wte
        model.lm_head = Int8Linear(wte.weight_int8, wte.scales)  # the same tensors
    kept_as_is = {name: tensor for name, tensor in weights.items() if name.endswith((".weight", ".bias"))}
    model.load_state_dict(kept_as_is, strict=False, assign=True)  # the LayerNorms and biases
    return model.eval(), mode


def dequantized_model(state: dict, config) -> GPT:
    """The model of a quantized checkpoint with its weights turned back into fp32 once: the same
    numbers (no bf16 rounding of activations, even), run by the fp32 kernels. Where the weights
    fit in cache, decoding is bound by per-call overhead and this runs faster than the int8/int4
    kernels; where reading the weights bounds it, the kernels win (`inference.fastest_form`)."""
    weights, fp32 = state["model"], {}
    for name, tensor in weights.items():
        if name.endswith(".int8"):
            fp32[name.removesuffix(".int8")] = dequantize_int8(tensor, weights[name.replace(".int8", ".scales")])
        elif name.endswith(".int4"):
            stem = name.removesuffix(".int4")
            fp32[stem] = dequantize_int4(tensor, weights[f"{stem}.scales"], weights[f"{stem}.zeros"])
        elif name.endswith((".weight", ".bias")):
            fp32[name] = tensor.float()
    if config.model.tie_head:
        fp32[TIED_HEAD] = fp32["transformer.wte.weight"]
    model = GPT(config.model, init_weights=False)
    model.load_state_dict(fp32)
    return model.eval()
