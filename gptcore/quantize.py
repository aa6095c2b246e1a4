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
- LayerNorm weights and biases: fp32 (a few KB).
The file is a plain dict (torch.load weights_only=True) that describes itself: format, version,
mode, group_size (0 when there are no groups), config, vocab, and "model", the tensors named after
the fp32 weight they replace (`transformer.h.0.mlp.c_fc.weight.int4` / `.scales` / `.zeros`).
Loading checks every name, shape and dtype against what quantizing a model of that config gives
(computed on the meta device, so a header that disagrees with the data is one clear error).

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
import json
from pathlib import Path

import torch
import torch.nn as nn

from gptcore import checkpoint
from gptcore.config import ModelConfig
from gptcore.errors import UserInputError
from gptcore.model import GPT

FORMAT = "gptcore-quantized"
FORMAT_VERSION = 1
MODES = ("int8", "int4", "bf16")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel accepts
EMBEDDINGS = ("transformer.wte.weight", "transformer.wpe.weight")
TIED_HEAD = "lm_head.weight"  # the token embedding; stored once


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


def quantize_weights(weights: dict[str, torch.Tensor], mode: str, group_size: int) -> dict[str, torch.Tensor]:
    """An fp32 model state dict -> the tensors a quantized checkpoint stores."""
    out = {}
    for name, tensor in weights.items():
        if name == TIED_HEAD:
            continue
        tensor = tensor.float()
        if mode == "bf16":
            out[name] = tensor.to(torch.bfloat16)
        elif tensor.dim() == 2 and (mode == "int8" or name in EMBEDDINGS):
            out[name + ".int8"], out[name + ".scales"] = quantize_int8(tensor)
        elif tensor.dim() == 2:
            out[name + ".int4"], out[name + ".scales"], out[name + ".zeros"] = quantize_int4(tensor, group_size)
        else:
            out[name] = tensor
    return out


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


def quantized_checkpoint(state: dict, mode: str, group_size: int) -> dict:
    """A trainer checkpoint -> a self-describing quantized checkpoint (no optimizer state)."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "mode": mode,
        "group_size": group_size if mode == "int4" else 0,
        "source_step": int(state.get("step", 0)),
        "config": state["config"],
        "vocab": state["vocab"],
        "model": quantize_weights(state["model"], mode, group_size),
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


def expected_layout(model: ModelConfig, mode: str, group_size: int) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a checkpoint of this config and mode must hold."""
    with torch.device("meta"):
        weights = GPT(model).state_dict()
        stored = quantize_weights(weights, mode, group_size)
    return {name: (tensor.shape, tensor.dtype) for name, tensor in stored.items()}


def check_header(state: dict, model: ModelConfig) -> tuple[str, int]:
    """The mode and group size, after checking the header is one this version can read. Raises
    ValueError with one line: load_model adds the path and how to fix it."""
    for key in ("version", "mode", "group_size", "model", "vocab"):
        if key not in state:
            raise ValueError(f"the header has no {key!r}")
    if state["version"] != FORMAT_VERSION:
        raise ValueError(f"format version {state['version']!r}, this gptcore reads version {FORMAT_VERSION}")
    mode, group_size = state["mode"], state["group_size"]
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (expected one of {', '.join(MODES)})")
    if not isinstance(group_size, int) or (mode == "int4") != (group_size > 0):
        raise ValueError(f"group_size {group_size!r} does not fit mode {mode}")
    if mode == "int4" and (problem := int4_problem(model, group_size)):
        raise ValueError(problem)
    if len(state["vocab"]) != model.vocab_size:
        raise ValueError(f"{len(state['vocab'])} vocabulary entries for vocab_size {model.vocab_size}")
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


def model_from_quantized(state: dict, config) -> tuple[GPT, str]:
    """The GPT a quantized checkpoint describes, ready for inference, and its mode."""
    if state["format"] != FORMAT:
        raise ValueError(f"unknown checkpoint format {state['format']!r}")
    mode, group_size = check_header(state, config.model)
    weights = state["model"]
    check_tensors(weights, expected_layout(config.model, mode, group_size), mode, group_size)
    with torch.device("meta"):
        model = GPT(config.model)
    if mode == "bf16":
        model.load_state_dict({**weights, TIED_HEAD: weights["transformer.wte.weight"]}, assign=True)
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
    wte = model.transformer.wte
    model.lm_head = Int8Linear(wte.weight_int8, wte.scales)  # tied: the same tensors
    kept_as_is = {name: tensor for name, tensor in weights.items() if name.endswith((".weight", ".bias"))}
    model.load_state_dict(kept_as_is, strict=False, assign=True)  # the LayerNorms and biases
    return model.eval(), mode


# ---------------------------------------------------------------------------------------------
# The command: quantize, write, measure, report


def check_group_size(mode: str, group_size: int, model: ModelConfig) -> None:
    if group_size <= 0:
        raise UserInputError(f"--group-size must be a positive number of weights per scale, got {group_size}; "
                             f"use one of {', '.join(map(str, INT4_GROUP_SIZES))}")
    if mode == "int4" and (problem := int4_problem(model, group_size)):
        raise UserInputError(f"--group-size: {problem}")


def decode_speed(loaded, tokens: int, seed: int) -> float:
    """Tokens/s of batch-1 sampling with the KV cache, after a short warm-up."""
    from gptcore.inference import generate_text

    generate_text(loaded, "\n", min(tokens, 8), seed=seed)
    return generate_text(loaded, "\n", tokens, seed=seed)[1]


def measure(reference, quantized, args) -> dict:
    """Loss on the same fixed batches and decode speed, for the fp32 model and the quantized one."""
    from gptcore.inference import evaluate

    report = {}
    if args.eval_batches > 0:
        before = evaluate(reference, args.data, args.eval_batches, args.batch_size)
        after = evaluate(quantized, args.data, args.eval_batches, args.batch_size)
        report["eval"] = {
            "batches": args.eval_batches, "batch_size": args.batch_size, "block_size": before["block_size"],
            "fp32": {"val_loss": before["val_loss"], "val_bpc": before["val_bpc"]},
            args.mode: {"val_loss": after["val_loss"], "val_bpc": after["val_bpc"]},
            "loss_change_pct": 100 * (after["val_loss"] / before["val_loss"] - 1),
        }
    if args.bench_tokens > 0:
        torch.set_num_threads(args.threads)
        seed = reference.config.train.seed
        fp32, mode = decode_speed(reference, args.bench_tokens, seed), decode_speed(quantized, args.bench_tokens, seed)
        report["decode"] = {"device": "cpu", "threads": args.threads, "new_tokens": args.bench_tokens,
                            "kv_cache": True, "fp32_tokens_per_s": fp32, f"{args.mode}_tokens_per_s": mode,
                            "speedup": mode / fp32}
    return report


def describe(report: dict) -> list[str]:
    mode, size = report["mode"], report["size_bytes"]
    lines = [f"size    fp32 {size['fp32'] / 1e6:.2f} MB -> {mode} {size[mode] / 1e6:.2f} MB "
             f"({100 * report['size_ratio']:.1f}% of fp32)"]
    if "eval" in report:
        e = report["eval"]
        lines.append(f"val     fp32 {e['fp32']['val_loss']:.4f} ({e['fp32']['val_bpc']:.4f} bits/char) -> {mode} "
                     f"{e[mode]['val_loss']:.4f} ({e[mode]['val_bpc']:.4f} bits/char), {e['loss_change_pct']:+.2f}% "
                     f"({e['batches']} batches x {e['batch_size']} x {e['block_size']} tokens)")
    if "decode" in report:
        d = report["decode"]
        lines.append(f"decode  fp32 {d['fp32_tokens_per_s']:.0f} -> {mode} {d[f'{mode}_tokens_per_s']:.0f} tokens/s "
                     f"(x{d['speedup']:.2f}; {d['new_tokens']} tokens, {d['threads']} thread(s), KV cache, CPU)")
    return lines


def main(args) -> None:
    from gptcore.inference import load_model

    source, out = Path(args.ckpt), Path(args.out)
    if out.resolve() == source.resolve() or out.suffix == ".json":
        raise UserInputError(f"--out {out} would overwrite the input checkpoint or the report; name it e.g. ckpt_int8.pt")
    for flag, lowest in (("eval_batches", 0), ("batch_size", 1), ("bench_tokens", 0), ("threads", 1)):
        if getattr(args, flag) < lowest:
            raise UserInputError(f"--{flag.replace('_', '-')} must be at least {lowest}, got {getattr(args, flag)}")
    state = checkpoint.load(source)
    if state["format"] == FORMAT:
        raise UserInputError(f"{source} is already quantized ({state.get('mode')}); pass the fp32 ckpt.pt "
                             "written by `gptcore train`")
    reference = load_model(source)
    check_group_size(args.mode, args.group_size, reference.config.model)

    quantized_state = quantized_checkpoint(state, args.mode, args.group_size)
    checkpoint.save(quantized_state, out)
    quantized = load_model(out)  # measure the file as written, through the loader users run
    report = {
        "mode": args.mode, "group_size": quantized_state["group_size"], "source": str(source), "out": str(out),
        "size_bytes": {"fp32": serialized_size(fp32_model_checkpoint(state)), args.mode: out.stat().st_size,
                       "source_file": source.stat().st_size},
    }
    report["size_ratio"] = report["size_bytes"][args.mode] / report["size_bytes"]["fp32"]
    report.update(measure(reference, quantized, args))
    report_path = out.with_suffix(".json")
    checkpoint.atomic_write_bytes(report_path, (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    print(f"wrote {out} ({args.mode}" + (f", group size {args.group_size}" if args.mode == "int4" else "") + ")")
    for line in describe(report):
        print(line)
    print(f"report  {report_path}")
