"""Training throughput on CPU: ms/step and tokens/s at two nanoGPT-comparable shapes.

    python bench/bench_train.py                      # both shapes, 2 threads
    python bench/bench_train.py --shape small --threads 1 --variants

Each run trains on tiny Shakespeare (../shared/data) or, without it, the default corpus, and
reports the median ms/step over the logged windows after warm-up. `--variants` times fp32 and
bf16 autocast, each with and without torch.compile, in the same process, one after the other,
so they compare as ratios.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from harness import REPO  # noqa: E402,F401  (puts the checkout on sys.path)
from arguments import BenchParser, at_least, thread_count

from gptcore.config import load_config  # noqa: E402
from gptcore.telemetry.metrics import read_metrics  # noqa: E402
from gptcore.training.train import Trainer  # noqa: E402
from shapes import SHAPES, data_path, overrides  # noqa: E402


def measure(shape: str, steps: int, threads: int, extra: list[str]) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, overrides(shape) + [
            f"data.path={data_path()}", f"out_dir={tmp}/run", f"train.max_iters={steps}", "train.log_interval=10",
            f"train.eval_interval={steps}", "train.eval_iters=1", "model.dropout=0.0", "train.sample_tokens=0",
            "profile.sampler=false", f"train.threads={threads}", "train.warmup_iters=10"] + extra)
        result = Trainer(config).run()
        records = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    windows = [r["ms_per_step"] for r in records if "ms_per_step" in r][2:]  # skip warm-up windows
    ms = statistics.median(windows)
    tokens = config.train.batch_size * config.model.block_size
    return {"shape": shape, "threads": threads, "extra": extra, "ms_per_step": round(ms, 2),
            "tokens_per_s": round(tokens / ms * 1000), "final_loss": round(result.train_loss, 4)}


def main() -> None:
    parser = BenchParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--threads", type=thread_count(1), default=2)
    parser.add_argument("--steps", type=at_least(0), default=0, help="default: 200 small, 60 medium")
    parser.add_argument("--variants", action="store_true")
    args = parser.parse_args()
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    variants = [[]]  # train.dtype=auto: bf16 autocast where the CPU does bf16 in hardware
    if args.variants:
        variants = [["train.dtype=float32"], ["train.dtype=float32", "train.compile=true"],
                    ["train.dtype=bfloat16"], ["train.dtype=bfloat16", "train.compile=true"]]
    for shape in shapes:
        steps = args.steps or (200 if shape == "small" else 60)
        for extra in variants:
            print(json.dumps(measure(shape, steps, args.threads, extra)), flush=True)


if __name__ == "__main__":
    main()
