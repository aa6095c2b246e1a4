"""Causal attention in CPU training: forward + backward of each way to run it.

    python bench/bench_attention.py [--threads 2] [--rounds 6]
    python bench/bench_attention.py --dropout 0.2     # with dropout, in fp32 and in bf16

From bf16 queries, keys and values, as the model's attention gets them:
- `fp32 flash`: scaled_dot_product_attention on fp32 copies, the result back in bf16;
- `bf16 flash`: scaled_dot_product_attention in bf16;
- `bf16 matmul`: bf16 matmuls and a softmax, the scores written out (gpt.matmul_attention).

The model takes `bf16 matmul` up to gpt.MATMUL_ATTENTION_MAX_TOKENS tokens and `bf16 flash`
beyond (gpt.attention_by_matmul); this is where that line comes from.

With --dropout, PyTorch's CPU flash kernels step aside (they have no dropout) for its math path,
which writes the scores out too and draws the mask with bernoulli_; each dtype's
scaled_dot_product_attention is timed against matmul_attention, whose mask is gpt.fast_dropout.
Training with dropout takes matmul_attention at any length and dtype; this is why.

The shapes are
bench_train.py's two and the presets' (batch cut where a call would take long: time scales with
it), and one of 1,024 tokens. Each
round times every variant, alternating their order; the table gives the median over rounds. The
process sets malloc's thresholds as a training rank does (gptcore.cluster.allocator): without
them, the scores' buffers go back to the kernel after every call, which costs the matmul path
up to half its speed at the larger shapes.
"""

from __future__ import annotations

import statistics
import time
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from harness import REPO  # noqa: F401  (puts the checkout on sys.path)
from arguments import BenchParser, at_least, probability, thread_count
from shapes import SHAPES

from gptcore.cluster.allocator import keep_buffers_in_heap
from gptcore.config import load_config
from gptcore.models.gpt import matmul_attention


def attention_shape(n_head: int, n_embd: int, block_size: int, batch_size: int) -> tuple[int, int, int, int]:
    """(batch, heads, tokens, head size) of a training shape's attention."""
    return batch_size, n_head, block_size, n_embd // n_head


def preset_shape(preset: str, batch_size: int | None = None) -> tuple[int, int, int, int]:
    config = load_config(preset)
    m = config.model
    return attention_shape(m.n_head, m.n_embd, m.block_size, batch_size or config.train.batch_size)


def bench_shape(name: str) -> tuple[int, int, int, int]:
    s = SHAPES[name]
    return attention_shape(s["n_head"], s["n_embd"], s["block_size"], s["batch_size"])


def attention_shapes() -> dict[str, tuple[int, int, int, int]]:
    return {"bench small": bench_shape("small"), "cpu, fast": preset_shape("fast"),
            "bench medium": bench_shape("medium"), "shakespeare_char": preset_shape("shakespeare_char"),
            "seed (batch 16)": preset_shape("seed", 16), "1024 tokens": (4, 12, 1024, 64)}


def fp32_flash(q, k, v):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(v.dtype)


def sdpa(dropout: float):
    """scaled_dot_product_attention in the inputs' dtype: bf16 flash attention without dropout."""
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)


def variants(dropout: float) -> dict[str, tuple[Callable, torch.dtype]]:
    """name: (attention, the dtype of its queries, keys and values)."""
    if not dropout:
        return {"fp32 flash": (fp32_flash, torch.bfloat16), "bf16 flash": (sdpa(0.0), torch.bfloat16),
                "bf16 matmul": (matmul_attention, torch.bfloat16)}
    written_out = partial(matmul_attention, dropout=dropout)
    return {"fp32 sdpa": (sdpa(dropout), torch.float32), "fp32 matmul": (written_out, torch.float32),
            "bf16 sdpa": (sdpa(dropout), torch.bfloat16), "bf16 matmul": (written_out, torch.bfloat16)}


def time_variants(shape: tuple[int, int, int, int], rounds: int, ways: dict[str, tuple[Callable, torch.dtype]]
                  ) -> dict[str, float]:
    """Median ms of one forward + backward per variant."""
    inputs = {dtype: [torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(4)]
              for dtype in {dtype for _, dtype in ways.values()}}  # queries, keys, values, the gradient
    batch, heads, tokens, _ = shape
    calls = max(2, int(2e7 / (batch * heads * tokens * tokens)))  # ~the same work per timing
    times: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(rounds):
        for name in (list(ways) if round_ % 2 == 0 else list(ways)[::-1]):
            attention, dtype = ways[name]
            q, k, v, grad = inputs[dtype]
            attention(q, k, v).backward(grad)  # warm-up
            start = time.perf_counter()
            for _ in range(calls):
                attention(q, k, v).backward(grad)
            times[name].append((time.perf_counter() - start) / calls * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = BenchParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=thread_count(1), default=2)
    parser.add_argument("--rounds", type=at_least(1), default=6)
    parser.add_argument("--dropout", type=probability, default=0.0, help="attention dropout (default: none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_buffers_in_heap()  # as a training rank does: the scores' buffers stay mapped between calls
    ways = variants(args.dropout)
    ratios = [("fp32 flash", "bf16 matmul")] if not args.dropout else [("fp32 matmul", "fp32 sdpa"),
                                                                      ("bf16 matmul", "bf16 sdpa")]
    print(f"torch {torch.__version__}, {args.threads} threads, dropout {args.dropout}, median of {args.rounds} "
          "rounds, forward + backward ms per call")
    print(f"| shape | (B, H, T, D) | {' | '.join(ways)} | {' | '.join(f'{a} / {b}' for a, b in ratios)} |")
    print("|---|---|" + "---|" * (len(ways) + len(ratios)))
    for name, shape in attention_shapes().items():
        ms = time_variants(shape, args.rounds, ways)
        cells = " | ".join(f"{ms[v]:.2f}" for v in ways)
        print(f"| {name} | {shape} | {cells} | {' | '.join(f'{ms[a] / ms[b]:.2f}x' for a, b in ratios)} |", flush=True)


if __name__ == "__main__":
    main()
