"""Step time and MFU of one training configuration under torchrun (NCCL + bf16 on a GPU).

    python bench/bench_gpu.py                                   # seed config, 1 GPU, 200 steps
    python bench/bench_gpu.py --nproc 1 --steps 100 --peak-tflops 989 train.compile=true
    python bench/bench_gpu.py --config tiny --steps 40 --peak-tflops 0.157   # a CPU smoke run

MFU = achieved model FLOPs / peak: tokens/s x FLOPs per token (6N + 12·L·C·T, forward and
backward, from gptcore.model.GPT.flops_per_token) / (ranks x peak). The peak defaults to the
card's dense bf16 figure for the GPUs we know; pass --peak-tflops for others.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gptcore.config import load_config  # noqa: E402
from gptcore.data import read_meta, resolve_data  # noqa: E402
from gptcore.model import GPT  # noqa: E402
from gptcore.metrics import read_metrics  # noqa: E402

# Dense bf16 tensor-core peaks (vendor data sheets, no sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def card_peak_tflops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for card, peak in PEAK_BF16_TFLOPS.items() if card in name), None)


def flops_per_token(config_name: str, overrides: list[str]) -> float:
    config = load_config(config_name, overrides)
    with tempfile.TemporaryDirectory() as scratch:
        meta = read_meta(resolve_data(config.data.path, config.data.clean, Path(scratch)))
    config.model.vocab_size = meta["vocab_size"]
    return GPT(config.model).flops_per_token()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="seed")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--peak-tflops", type=float, default=None, help="per device; default: the card's bf16 peak")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    peak = args.peak_tflops or card_peak_tflops()
    if not peak:
        sys.exit("bench_gpu: unknown device peak; pass --peak-tflops")
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"out_dir={tmp}/run", f"train.max_iters={args.steps}", "train.log_interval=10",
                     f"train.eval_interval={args.steps}", "train.eval_iters=1", "train.sample_tokens=0",
                     *args.overrides]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                   "-m", "gptcore", "train", "--config", args.config, *overrides]
        subprocess.run(command, cwd=REPO, check=True)
        records = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    steps = [r for r in records if "ms_per_step" in r][2:]  # the first windows hold warm-up and compile
    ms = statistics.median(r["ms_per_step"] for r in steps)
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steps)
    flops = flops_per_token(args.config, overrides)
    mfu = tokens_per_s * flops / (args.nproc * peak * 1e12)
    print(json.dumps({"config": args.config, "ranks": args.nproc, "ms_per_step": round(ms, 2),
                      "tokens_per_s": round(tokens_per_s), "flops_per_token": flops,
                      "peak_tflops_per_device": peak, "mfu": round(mfu, 4), "overrides": args.overrides}))


if __name__ == "__main__":
    main()
