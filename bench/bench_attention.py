"""Causal attention in CPU training under bf16 autocast: forward + backward of each way to run it.

    python bench/bench_attention.py [--threads 2] [--rounds 6]

From bf16 queries, keys and values, as the model's attention gets them:
- `fp32 flash`: scaled_dot_product_attention on fp32 copies, the result back in bf16;
- `bf16 flash`: scaled_dot_product_attention in bf16;
- `bf16 matmul`: bf16 matmuls and a softmax, the scores written out (gpt.matmul_attention).

The model takes `bf16 matmul` up to gpt.MATMUL_ATTENTION_MAX_TOKENS tokens and `fp32 flash`
beyond (gpt.attention_path); this is where that line comes from. The shapes are the presets'
heads, tokens and head sizes (batch cut where a call would take long: time scales with it). Each
round times every variant, alternating their order; the table gives the median over rounds. The
process sets malloc's thresholds as a training rank does (gptcore.cluster.allocator): without
them, the scores' buffers go back to the kernel after every call, which costs the matmul path
up to half its speed at the larger shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from harness import REPO  # noqa: F401  (puts the checkout on sys.path)

from gptcore.cluster.allocator import keep_buffers_in_heap
from gptcore.models.gpt import matmul_attention

SHAPES = {  # (batch, heads, tokens, head size)
    "bench small": (12, 4, 64, 32),
    "cpu, fast": (32, 4, 128, 32),
    "bench medium": (16, 8, 128, 32),
    "shakespeare_char": (64, 6, 256, 64),
    "seed": (16, 8, 512, 64),
    "1024 tokens": (4, 12, 1024, 64),
}


def fp32_flash(q, k, v):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(v.dtype)


def bf16_flash(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


VARIANTS = {"fp32 flash": fp32_flash, "bf16 flash": bf16_flash, "bf16 matmul": matmul_attention}


def time_variants(shape: tuple[int, int, int, int], rounds: int) -> dict[str, float]:
    """Median ms of one forward + backward per variant."""
    q, k, v = (torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad = torch.randn(*shape, dtype=torch.bfloat16)
    batch, heads, tokens, _ = shape
    calls = max(2, int(2e7 / (batch * heads * tokens * tokens)))  # ~the same work per timing
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(rounds):
        for name in (list(VARIANTS) if round_ % 2 == 0 else list(VARIANTS)[::-1]):
            VARIANTS[name](q, k, v).backward(grad)  # warm-up
            start = time.perf_counter()
            for _ in range(calls):
                VARIANTS[name](q, k, v).backward(grad)
            times[name].append((time.perf_counter() - start) / calls * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_buffers_in_heap()  # as a training rank does: the scores' buffers stay mapped between calls
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.rounds} rounds, "
          "forward + backward ms per call")
    print(f"| shape | (B, H, T, D) | {' | '.join(VARIANTS)} | fp32 flash / bf16 matmul |")
    print("|---|---|" + "---|" * len(VARIANTS) + "---|")
    for name, shape in SHAPES.items():
        ms = time_variants(shape, args.rounds)
        cells = " | ".join(f"{ms[v]:.2f}" for v in VARIANTS)
        print(f"| {name} | {shape} | {cells} | {ms['fp32 flash'] / ms['bf16 matmul']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
