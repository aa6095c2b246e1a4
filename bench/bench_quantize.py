"""Weight-only quantization on CPU: file size, loss and batch-1 decode speed of fp32 / int8 / int4,
and the KV cache against recomputing the window.

    gptcore train --config cpu out_dir=runs/cpu
    python bench/bench_quantize.py --ckpt runs/cpu/ckpt.pt                  # 1 thread, 5 repeats
    python bench/bench_quantize.py --ckpt runs/cpu/ckpt.pt --variants --repeats 3   # + what was tried
    python bench/bench_quantize.py --ckpt runs/cpu/ckpt.pt --threads 2 --json bench_quantize.json

Two models:
- the trained checkpoint (--ckpt, e.g. the cpu config): each mode is written to a file and loaded
  through gptcore's loader; file size, val loss on the same fixed batches, decode tokens/s;
- the seed shape (8 layers, 8 heads, n_embd 512, block 512, 25M parameters) with random weights,
  where decode is bound by reading the weights: the speed of int8 / int4 (with --variants, also
  the ways of computing with them that were tried: the kernels on fp32 activations, dequantizing
  the whole matrix in forward, torchao when it is importable, bf16 weights), and the KV cache
  against no cache at --tokens new tokens.
Decode = model.generate from a one-token prompt, --tokens new tokens, temperature 0.8, top-k 200.
Each repeat times every variant once, in turn, so load from other processes on the machine falls
on all of them alike; the tables give medians over repeats, ratios are of medians from this run.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from arguments import BenchParser, at_least, data_source, existing_file, output_path, thread_count  # noqa: E402

from gptcore.checkpointing import checkpoint  # noqa: E402
from gptcore.files import atomic_write_bytes  # noqa: E402
from gptcore.config import load_config  # noqa: E402
from gptcore.inference.generate import evaluate, load_model  # noqa: E402
from gptcore.models.gpt import GPT  # noqa: E402
from gptcore.inference.weight_layout import column_major_linears  # noqa: E402
from gptcore.inference.quantize import (  # noqa: E402
    Int4Linear, Int8Linear, dequantize_int4, dequantize_int8, fp32_model_checkpoint, model_from_quantized,
    quantized_checkpoint)

MODES = (("int8", 0), ("int4", 64))


class Fp32ActivationInt8Linear(Int8Linear):
    """Tried: the int8 kernel on fp32 activations (with fp32 scales)."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x.float(), self.weight_int8, self.scales.float()).to(x.dtype)


class Fp32ActivationInt4Linear(Int4Linear):
    """Tried: the int4 kernel on fp32 activations (with an fp32 scale-and-zero table)."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.float(), self.weight_int4pack, self.group_size, self.scales_and_zeros.float()).to(x.dtype)


class DequantizingInt8Linear(Int8Linear):
    """Tried: dequantize the whole int8 matrix on every call, then a float matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_int8(self.weight_int8, self.scales), self.bias)


class DequantizingInt4Linear(nn.Module):
    """Tried: unpack and dequantize the whole int4 matrix on every call, then a float matmul."""

    def __init__(self, packed, scales, zeros, bias=None):
        super().__init__()
        self.packed, self.scales, self.zeros, self.bias = packed, scales, zeros, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_int4(self.packed, self.scales, self.zeros), self.bias)


def decode_tokens_per_s(model: nn.Module, tokens: int, use_cache: bool = True) -> float:
    idx = torch.zeros((1, 1), dtype=torch.long)
    generator = torch.Generator().manual_seed(1337)
    start = time.perf_counter()
    model.generate(idx, tokens, temperature=0.8, top_k=200, generator=generator, use_cache=use_cache)
    return tokens / (time.perf_counter() - start)


def median_speeds(variants: dict[str, nn.Module], tokens: int, repeats: int, use_cache: bool = True) -> dict:
    """Median tokens/s per variant, timing the variants round-robin within each repeat."""
    for model in variants.values():
        decode_tokens_per_s(model, 8, use_cache)  # warm-up: allocator, kernel dispatch, packing caches
    runs = {name: [] for name in variants}
    for _ in range(repeats):
        for name, model in variants.items():
            runs[name].append(decode_tokens_per_s(model, tokens, use_cache))
    return {name: {"median": statistics.median(r), "min": min(r), "max": max(r)} for name, r in runs.items()}


def with_matrices_replaced(model: nn.Module, make) -> nn.Module:
    """A copy of a quantized model whose attention and MLP modules are rebuilt by make(name, module)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, (Int8Linear, Int4Linear)) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(name, module))
    return model


def torchao_variants(fp32: GPT) -> dict[str, nn.Module]:
    """torchao's weight-only configs on the same model, fp32 and cast to bf16, when torchao is
    importable (the attention and MLP matrices; the head is 65 x 512, too narrow for the int4
    kernel, and stays unquantized)."""
    try:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return {}
    variants = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, config in (("int8", Int8WeightOnlyConfig()), ("int4 g64", PrototypeInt4WeightOnlyConfig(group_size=64))):
            model = copy.deepcopy(fp32).to(dtype)
            quantize_(model, config, filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and fqn != "lm_head")
            variants[f"torchao {name}, {str(dtype).removeprefix('torch.')} model"] = model
    return variants


def seed_shape_variants(config, vocab: list[str], tried: bool) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    fp32 = GPT(config.model).eval()
    state = {"model": fp32.state_dict(), "config": config.to_dict(), "vocab": vocab}
    variants = {"fp32": column_major_linears(copy.deepcopy(fp32))}  # as gptcore loads fp32 on the CPU
    stored = {}
    for mode, group in MODES:
        quantized = quantized_checkpoint(state, mode, group)
        stored[mode] = quantized["model"]
        variants[mode + (f" g{group}" if group else "")] = model_from_quantized(quantized, config)[0]
    if not tried:
        return variants
    w4 = stored["int4"]
    variants["int8 kernel, fp32 activations"] = with_matrices_replaced(variants["int8"], lambda name, m: (
        Fp32ActivationInt8Linear(m.weight_int8, m.scales, m.bias)))
    variants["int4 g64 kernel, fp32 activations"] = with_matrices_replaced(variants["int4 g64"], lambda name, m: (
        Fp32ActivationInt4Linear(w4[f"{name}.weight.int4"], w4[f"{name}.weight.scales"], w4[f"{name}.weight.zeros"],
                                 m.bias)))
    variants["int8 dequant-in-forward"] = with_matrices_replaced(variants["int8"], lambda name, m: (
        DequantizingInt8Linear(m.weight_int8, m.scales, m.bias)))
    variants["int4 g64 dequant-in-forward"] = with_matrices_replaced(variants["int4 g64"], lambda name, m: (
        DequantizingInt4Linear(w4[f"{name}.weight.int4"], w4[f"{name}.weight.scales"], w4[f"{name}.weight.zeros"],
                               m.bias)))
    variants["bf16 weights"] = copy.deepcopy(fp32).to(torch.bfloat16)
    variants.update(torchao_variants(fp32))
    return variants


def bench_seed_shape(args) -> dict:
    config = load_config("seed", ["model.dropout=0.0"])
    vocab = [chr(32 + i) for i in range(65)]
    config.model.vocab_size = len(vocab)
    variants = seed_shape_variants(config, vocab, args.variants)
    cached = median_speeds(variants, args.tokens, args.repeats)
    uncached = median_speeds({"fp32": variants["fp32"]}, args.tokens, args.no_cache_repeats, use_cache=False)
    return {"shape": "seed: 8 layers, 8 heads, n_embd 512, block 512, vocab 65, random weights",
            "kv_cache": cached, "no_cache": uncached,
            "kv_cache_speedup_fp32": cached["fp32"]["median"] / uncached["fp32"]["median"]}


def bench_checkpoint(args) -> dict:
    state = checkpoint.load(args.ckpt, checkpoint.FORMAT)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {"fp32": Path(tmp) / "fp32.pt"}
        checkpoint.save(fp32_model_checkpoint(state), files["fp32"])
        for mode, group in MODES:
            files[mode] = Path(tmp) / f"{mode}.pt"
            checkpoint.save(quantized_checkpoint(state, mode, group), files[mode])
        loaded = {mode: load_model(path) for mode, path in files.items()}
        speeds = median_speeds({mode: m.model for mode, m in loaded.items()}, args.tokens, args.repeats)
        data = args.data or str(Path(args.ckpt).parent / "data")  # the run's own prepared data
        for mode, model in loaded.items():
            result = evaluate(model, data, args.eval_batches, 16)
            rows[mode] = {"bytes": files[mode].stat().st_size, "val_loss": result["val_loss"],
                          "val_bpc": result["val_bpc"], "tokens_per_s": speeds[mode]}
    for row in rows.values():
        row["size_ratio"] = row["bytes"] / rows["fp32"]["bytes"]
        row["loss_change_pct"] = 100 * (row["val_loss"] / rows["fp32"]["val_loss"] - 1)
    model = loaded["fp32"].config.model
    return {"checkpoint": str(args.ckpt), "shape": f"{model.n_layer} layers, {model.n_head} heads, "
            f"n_embd {model.n_embd}, block {model.block_size}, vocab {model.vocab_size}",
            "eval": f"{args.eval_batches} val batches x 16 x {model.block_size} tokens", "modes": rows}


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}; {results['threads']} thread(s); {results['tokens']} new tokens; "
             f"median of {results['repeats']} repeats (min-max); load average {results['load_before']} before, "
             f"{results['load_after']} after."]
    if "checkpoint" in results:
        c = results["checkpoint"]
        lines += ["", f"Trained checkpoint {c['checkpoint']} ({c['shape']}); loss on {c['eval']}:", "",
                  "| mode | file | of fp32 | val loss | bits/char | loss change | decode tokens/s (KV cache) |",
                  "|---|---|---|---|---|---|---|"]
        for mode, r in c["modes"].items():
            s = r["tokens_per_s"]
            lines.append(f"| {mode} | {r['bytes'] / 1e6:.2f} MB | {100 * r['size_ratio']:.1f}% | {r['val_loss']:.4f} | "
                         f"{r['val_bpc']:.4f} | {r['loss_change_pct']:+.2f}% | {s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f}) |")
    s = results["seed_shape"]
    fp32 = s["kv_cache"]["fp32"]["median"]
    lines += ["", f"Seed shape ({s['shape']}), decode with the KV cache:", "",
              "| variant | tokens/s | vs fp32 |", "|---|---|---|"]
    for name, r in s["kv_cache"].items():
        lines.append(f"| {name} | {r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f}) | x{r['median'] / fp32:.2f} |")
    u = s["no_cache"]["fp32"]
    lines += ["", f"KV cache vs no cache (fp32, seed shape): {fp32:.1f} vs {u['median']:.1f} tokens/s "
              f"({u['min']:.1f}-{u['max']:.1f}), x{s['kv_cache_speedup_fp32']:.1f}"]
    return "\n".join(lines)


def main() -> None:
    parser = BenchParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=existing_file, default=None, help="a trained fp32 checkpoint (skipped when absent)")
    parser.add_argument("--data", type=data_source, default=None, help="text to evaluate on (default: the run's data beside --ckpt)")
    parser.add_argument("--threads", type=thread_count(1), default=1)
    parser.add_argument("--tokens", type=at_least(1), default=500)
    parser.add_argument("--repeats", type=at_least(1), default=5)
    parser.add_argument("--no-cache-repeats", type=at_least(1), default=3)
    parser.add_argument("--eval-batches", type=at_least(1), default=50)
    parser.add_argument("--variants", action="store_true", help="also time the alternatives that were tried")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    json_path = output_path(args.json, "--json")
    torch.set_num_threads(args.threads)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
               "threads": args.threads, "tokens": args.tokens, "repeats": args.repeats,
               "load_before": round(os.getloadavg()[0], 2)}
    if args.ckpt:
        results["checkpoint"] = bench_checkpoint(args)
    results["seed_shape"] = bench_seed_shape(args)
    results["load_after"] = round(os.getloadavg()[0], 2)
    print(markdown(results))
    if json_path:
        atomic_write_bytes(json_path, (json.dumps(results, indent=2) + "\n").encode("utf-8"))


if __name__ == "__main__":
    main()
