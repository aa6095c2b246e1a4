"""gptcore against nanoGPT on this machine: ms/iter at the same shapes, threads and data.

    git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt
    cp ../shared/data/tinyshakespeare.txt /tmp/nanogpt/data/shakespeare_char/input.txt
    (cd /tmp/nanogpt && python data/shakespeare_char/prepare.py)
    python bench/bench_vs_nanogpt.py --nanogpt /tmp/nanogpt

Both trainers run as whole processes, one after the other and alternating over --rounds, so that
load from elsewhere hits both alike: nanoGPT's own train.py (CPU, no compile, as its README runs
it), and `gptcore train` in fp32 and with `train.dtype=auto` (bf16 autocast where the CPU does
bf16 in hardware). Each run's time is the median of its per-iteration times after --skip
iterations (nanoGPT prints one per iteration; gptcore logs 5-step windows), and each row the
median over rounds.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from arguments import BenchParser, at_least, checkout, thread_count
from shapes import REPO, SHAPES, overrides

from gptcore.telemetry.metrics import read_metrics

NANOGPT_ITER = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms", re.M)


def run(command: list[str], cwd: Path, threads: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise SystemExit(f"bench_vs_nanogpt: {' '.join(command[:3])} failed:\n{result.stderr[-2000:]}")
    return result.stdout


def nanogpt_ms(nanogpt: Path, shape: str, iters: int, skip: int, threads: int) -> float:
    flags = [f"--{key}={value}" for key, value in SHAPES[shape].items()]
    out = run([sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
               "--eval_iters=1", "--eval_interval=100000", "--log_interval=1", f"--max_iters={iters}",
               f"--lr_decay_iters={iters}", "--warmup_iters=10", "--dropout=0.0", "--always_save_checkpoint=False",
               *flags], nanogpt, threads)
    times = [float(ms) for step, ms in NANOGPT_ITER.findall(out) if int(step) >= skip]
    return statistics.median(times)


def gptcore_ms(data: Path, shape: str, iters: int, skip: int, threads: int, dtype: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run([sys.executable, "-m", "gptcore", "train", *overrides(shape), f"data.path={data}", f"out_dir={tmp}",
             f"train.max_iters={iters}", "train.warmup_iters=10", "train.log_interval=5", f"train.eval_interval={iters}", "train.eval_iters=1", "model.dropout=0.0",
             "train.sample_tokens=0", "profile.sampler=false", f"train.threads={threads}", f"train.dtype={dtype}"],
            REPO, threads)
        records = read_metrics(Path(tmp) / "metrics.jsonl")
    return statistics.median(r["ms_per_step"] for r in records if "ms_per_step" in r and r["step"] > skip)


def main() -> int:
    parser = BenchParser(description=__doc__.splitlines()[0])
    prepared = ("train.py", "data/shakespeare_char/input.txt", "data/shakespeare_char/train.bin")
    parser.add_argument("--nanogpt", type=checkout(prepared, "a nanoGPT checkout where data/shakespeare_char/"
                                                   "prepare.py has run"),
                        required=True, help="a nanoGPT checkout with shakespeare_char prepared")
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--threads", type=thread_count(1), default=2)
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--skip", type=at_least(0), default=10, help="warm-up iterations left out")
    args = parser.parse_args()
    data = args.nanogpt / "data" / "shakespeare_char" / "input.txt"
    print(f"{args.threads} threads, {args.rounds} rounds, median ms/iter after {args.skip} iterations; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print("| shape | nanoGPT ms/iter | gptcore fp32 | gptcore auto | nanoGPT / gptcore fp32 | nanoGPT / gptcore auto |")
    print("|---|---|---|---|---|---|")
    for name in SHAPES if args.shape == "all" else [args.shape]:
        iters = 100 if name == "small" else 40
        rows = {"nanogpt": [], "float32": [], "auto": []}
        for _ in range(args.rounds):
            rows["nanogpt"].append(nanogpt_ms(args.nanogpt, name, iters, args.skip, args.threads))
            for dtype in ("float32", "auto"):
                rows[dtype].append(gptcore_ms(data, name, iters, args.skip, args.threads, dtype))
            print(json.dumps({"shape": name, **{k: v[-1] for k, v in rows.items()}}), file=sys.stderr, flush=True)
        nano, fp32, auto = (statistics.median(rows[k]) for k in ("nanogpt", "float32", "auto"))
        print(f"| {name} | {nano:.1f} | {fp32:.1f} | {auto:.1f} | {nano / fp32:.2f}x | {nano / auto:.2f}x |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
