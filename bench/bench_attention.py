"""Causal attention on the CPU: forward and backward of scaled_dot_product_attention in fp32 and bf16.

    python bench/bench_attention.py [--threads 2]

At the attention shapes of bench_train.py's two training shapes. The bf16 backward is the reason
gptcore's model keeps attention in fp32 when it trains under CPU autocast (GPT.attend).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from shapes import SHAPES


def attention_shape(name: str) -> tuple[int, int, int, int]:
    """(batch, heads, tokens, head size) of a training shape's attention."""
    s = SHAPES[name]
    return s["batch_size"], s["n_head"], s["block_size"], s["n_embd"] // s["n_head"]


def time_attention(shape: tuple[int, ...], dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(*shape, dtype=dtype)
    forward, backward = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        middle = time.perf_counter()
        y.backward(grad)
        forward.append(middle - start)
        backward.append(time.perf_counter() - middle)
    skip = repeats // 10  # warm-up
    return 1000 * statistics.median(forward[skip:]), 1000 * statistics.median(backward[skip:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} calls")
    print("| shape (B, H, T, D) | dtype | forward ms | backward ms | backward vs fp32 |")
    print("|---|---|---|---|---|")
    for name in SHAPES:
        shape = attention_shape(name)
        fp32 = time_attention(shape, torch.float32, args.repeats)
        bf16 = time_attention(shape, torch.bfloat16, args.repeats)
        for dtype, (fwd, bwd) in (("fp32", fp32), ("bf16", bf16)):
            print(f"| {name} {shape} | {dtype} | {fwd:.3f} | {bwd:.3f} | {bwd / fp32[1]:.2f}x |")


if __name__ == "__main__":
    main()
