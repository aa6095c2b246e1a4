"""Batch-1 decode where small models run: gptcore in each mode against llama.cpp on the exported
GGUF file of each type, at the `tiny`, `cpu`, `shakespeare_char` and `seed` shapes, on this CPU.

    bash env/setup.sh --llama                                   # llama-cpp-python, for the exports
    cmake -B /tmp/llama-build -S <llama.cpp> -DCMAKE_BUILD_TYPE=Release && \\
        cmake --build /tmp/llama-build --target llama-bench -j   # llama.cpp's own llama-bench
    git clone https://github.com/karpathy/nanoGPT /tmp/nanogpt && pip install tiktoken   # its sample.py
    python bench/bench_runtimes.py --llama-bench /tmp/llama-build/bin/llama-bench --threads 1,2 \
        --nanogpt /tmp/nanogpt

Per shape, a model is trained for a few steps (speed does not depend on what the weights hold),
quantized (int8, int4, bf16) and exported (GGUF f32, f16, q8_0, q4_0). Then, in rounds that
alternate every row so that load from elsewhere falls on all alike:
- gptcore: `model.generate` with the KV cache, from a one-token prompt, --tokens new tokens (the
  window slides past block_size); int8 and int4 both by their kernels and as `gptcore sample`
  runs them (`inference.fastest_form`: kernels or the same weights in fp32, whichever is faster);
- llama.cpp: `llama-bench -p 0 -n N` (its own token-generation timer), N = min(--tokens,
  block_size - 1), because llama.cpp cannot slide learned positions past the context.
Rows give the median tokens/s over rounds with min-max, the ratio to gptcore fp32 of the same
round, the file size (fp32: ckpt.pt, which holds the optimizer state too), and the weight bytes
read per token x tokens/s against the copy bandwidth that gptcore measures
(`hardware.memory_gbps`). Then, at --process-shapes, whole processes, alternating: see
whole_processes. --json keeps every number.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness import REPO
from arguments import (BenchParser, at_least, checkout, is_program, listed, one_of, output_path, program, refuse,
                       thread_count)
from shapes import data_path

from gptcore.checkpointing.sharded import open_checkpoint  # noqa: E402
from gptcore.files import atomic_write_bytes  # noqa: E402
from gptcore.inference.generate import fastest_form, load_model, timed_generate, weight_bytes  # noqa: E402
from gptcore.telemetry import hardware  # noqa: E402

SHAPES = ("tiny", "cpu", "shakespeare_char", "seed")
GPTCORE_MODES = ("fp32", "bf16", "int8", "int4")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
NANOGPT_FILES = ("sample.py", "model.py", "configurator.py")  # what sample.py runs on


def gptcore(*args: str, threads: int = 2) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, "-m", "gptcore", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=1800)
    if result.returncode:
        raise SystemExit(f"bench_runtimes: gptcore {' '.join(args[:3])} failed: {result.stderr[-1500:]}")
    return result.stdout


def make_files(shape: str, work: Path) -> dict[str, Path]:
    """Every file of one shape: ckpt.pt, its quantized copies and its GGUF exports."""
    run = work / shape
    gptcore("train", "--config", shape, f"data.path={data_path()}", f"out_dir={run}", "train.max_iters=2",
            "train.eval_interval=1000", "train.eval_iters=1", "train.batch_size=2", "train.sample_tokens=0",
            "log.tensorboard=false", "train.compile=false", "train.warmup_iters=1")
    files = {"fp32": run / "ckpt.pt"}
    for mode in GPTCORE_MODES[1:]:
        files[mode] = run / f"ckpt_{mode}.pt"
        gptcore("quantize", "--ckpt", str(files["fp32"]), "--mode", mode, "--out", str(files[mode]),
                "--eval-batches", "0", "--bench-tokens", "0", "--device", "cpu")
    for kind in GGUF_TYPES:
        files[f"gguf {kind}"] = run / f"model-{kind}.gguf"
        gptcore("export", "--ckpt", str(files["fp32"]), "--format", "gguf", "--type", kind,
                "--out", str(files[f"gguf {kind}"]))
    return files


def gptcore_speed(loaded, tokens: int) -> float:
    """Tokens/s as `sample` times them: after a short warm-up, temperature 0.8, top-k 200."""
    idx = torch.tensor([loaded.tokenizer.encode("\n")], dtype=torch.long)
    return timed_generate(loaded, idx, tokens, 1337, 0.8, 200, True, False)[1]


def llama_bench_speed(binary: str, path: Path, tokens: int, threads: int) -> float:
    result = subprocess.run([binary, "-m", str(path), "-p", "0", "-n", str(tokens), "-t", str(threads), "-r", "1",
                             "-o", "json"], capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise SystemExit(f"bench_runtimes: llama-bench on {path} failed: {result.stderr[-1500:]}")
    return float(json.loads(result.stdout)[0]["avg_ts"])


def measure_shape(shape: str, files: dict[str, Path], args, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = {}
    for mode in GPTCORE_MODES:
        state = open_checkpoint(files[mode])
        loaded = load_model(files[mode], "cpu", state)
        rows[f"gptcore {mode}"] = (loaded, files[mode])
        if mode in ("int8", "int4"):
            rows[f"gptcore {mode} as sample runs it"] = (fastest_form(loaded, state), files[mode])
    block = rows["gptcore fp32"][0].config.model.block_size
    llama_tokens = min(args.tokens, block - 1)
    if args.llama_bench:
        for kind in GGUF_TYPES:
            rows[f"llama.cpp {kind}"] = (None, files[f"gguf {kind}"])
    speeds = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, (loaded, path) in rows.items():
            speeds[name].append(gptcore_speed(loaded, args.tokens) if loaded is not None
                                else llama_bench_speed(args.llama_bench, path, llama_tokens, threads))
    peak, source = hardware.memory_gbps(torch.device("cpu"))
    fp32 = speeds["gptcore fp32"]
    out = []
    for name, (loaded, path) in rows.items():
        median = statistics.median(speeds[name])
        read = weight_bytes(loaded.model) if loaded is not None else path.stat().st_size
        out.append({
            "shape": shape, "threads": threads, "row": name, "tokens": args.tokens if loaded is not None else llama_tokens,
            "tokens_per_s": median, "min": min(speeds[name]), "max": max(speeds[name]), "all": speeds[name],
            "vs_fp32": statistics.median(s / f for s, f in zip(speeds[name], fp32)),
            "file_bytes": path.stat().st_size, "weight_bytes_per_token": read,
            "gbps": read * median / 1e9, "copy_gbps": peak, "bandwidth_source": source,
            "runs_as": getattr(loaded, "runs_as", "") if loaded is not None else "",
        })
    return out


def timed_process(command: list[str], cwd: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    elapsed = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"bench_runtimes: {' '.join(command[:4])} failed: {result.stderr[-1500:]}")
    return elapsed


def nanogpt_directory(checkout: Path, ckpt: Path) -> Path:
    """Where nanoGPT's sample.py runs on CKPT's weights without touching the checkout: beside
    links to its files, out/ holds the exported checkpoint and data/<dataset>/ its meta.pkl (read
    from the working directory)."""
    where = ckpt.parent / "nanogpt"
    if not where.exists():
        gptcore("export", "--ckpt", str(ckpt), "--format", "nanogpt", "--out", str(where / "out"))
        for name in NANOGPT_FILES:
            (where / name).symlink_to(checkout.resolve() / name)
        meta_dir = where / "data" / torch.load(where / "out" / "ckpt.pt", weights_only=True)["config"]["dataset"]
        meta_dir.mkdir(parents=True)
        (meta_dir / "meta.pkl").write_bytes((where / "out" / "meta.pkl").read_bytes())
    return where


def llama_completion(llama_bench: str) -> str:
    """llama.cpp's llama-completion, built beside llama-bench."""
    return str(Path(llama_bench).with_name("llama-completion"))


def whole_processes(shape: str, files: dict[str, Path], args, threads: int) -> list[dict]:
    """A 500-token continuation as a user runs it, start-up included: `gptcore sample` per mode,
    nanoGPT's sample.py on the same weights (--nanogpt), llama.cpp's llama-completion (beside
    --llama-bench; it stops at the context), and `import torch` alone, the floor of a PyTorch tool."""
    python = sys.executable
    commands = {"python -c 'import torch' (the floor)": ([python, "-c", "import torch"], REPO)}
    sample = [python, "-m", "gptcore", "sample", "--prompt", "\n", "--tokens", str(args.tokens), "--threads",
              str(threads), "--ckpt"]
    for mode in ("fp32", "int8", "int4"):
        commands[f"gptcore sample {mode}"] = ([*sample, str(files[mode])], REPO)
        if mode != "fp32":  # without the probe that picks kernels or fp32 weights
            commands[f"gptcore sample {mode} --weights quantized"] = (
                [*sample, str(files[mode]), "--weights", "quantized"], REPO)
    if args.nanogpt:
        commands["nanoGPT sample.py (fp32, no KV cache)"] = (
            [python, "sample.py", "--out_dir=out", "--device=cpu", "--num_samples=1", "--dtype=float32",
             f"--max_new_tokens={args.tokens}", "--compile=False"], nanogpt_directory(args.nanogpt, files["fp32"]))
    if args.llama_bench:
        completion = llama_completion(args.llama_bench)
        block = load_model(files["fp32"], "cpu").config.model.block_size
        for kind in ("f32", "q8_0"):
            commands[f"llama-completion {kind} ({min(args.tokens, block - 1)} tokens: the context)"] = (
                [completion, "-m", str(files[f"gguf {kind}"]), "-p", "\n", "-n", str(min(args.tokens, block - 1)),
                 "-c", str(block), "-t", str(threads), "-no-cnv", "--no-warmup"], REPO)
    seconds = {name: [] for name in commands}
    for _ in range(args.rounds):
        for name, (command, cwd) in commands.items():
            seconds[name].append(timed_process(command, cwd, threads))
    nano_key = next((name for name in seconds if name.startswith("nanoGPT")), None)
    rows = []
    for name, values in seconds.items():
        row = {"shape": shape, "threads": threads, "row": name, "seconds": statistics.median(values),
               "min": min(values), "max": max(values), "all": values}
        if nano_key:
            row["nanogpt_over_this"] = statistics.median(n / v for n, v in zip(seconds[nano_key], values))
        rows.append(row)
    return rows


def process_table(rows: list[dict]) -> str:
    lines = ["| shape | threads | command | wall s (min-max) | nanoGPT's time / this |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['nanogpt_over_this']:.1f}x" if "nanogpt_over_this" in r else "—"
        lines.append(f"| {r['shape']} | {r['threads']} | {r['row']} | {r['seconds']:.2f} ({r['min']:.2f}-{r['max']:.2f}) "
                     f"| {ratio} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| shape | threads | runtime | tokens/s (min-max) | vs gptcore fp32 | file | GB/s read (of copy) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        note = f" ({r['runs_as']})" if r["runs_as"] else ""
        lines.append(f"| {r['shape']} | {r['threads']} | {r['row']}{note} | {r['tokens_per_s']:.0f} "
                     f"({r['min']:.0f}-{r['max']:.0f}) | {r['vs_fp32']:.2f}x | {r['file_bytes'] / 1e6:.2f} MB | "
                     f"{r['gbps']:.1f} ({100 * r['gbps'] / r['copy_gbps']:.0f}%) |")
    return "\n".join(lines)


def main() -> None:
    parser = BenchParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=listed(one_of(*SHAPES)), default=list(SHAPES), help="comma-separated")
    parser.add_argument("--threads", type=listed(thread_count(1)), default=[1], help="comma-separated thread counts")
    parser.add_argument("--tokens", type=at_least(1), default=500)
    parser.add_argument("--rounds", type=at_least(1), default=5)
    parser.add_argument("--llama-bench", type=program, default=None,
                        help="llama.cpp's llama-bench binary (rows skipped without)")
    parser.add_argument("--nanogpt", type=checkout(NANOGPT_FILES, "a nanoGPT checkout (git clone "
                                                   "https://github.com/karpathy/nanoGPT)"),
                        default=None, help="a nanoGPT checkout, for its sample.py as a whole process")
    parser.add_argument("--process-shapes", type=lambda text: listed(one_of(*SHAPES))(text) if text else [],
                        default=["shakespeare_char"], help="shapes whose whole-process sample is timed ('' for none)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    json_path = output_path(args.json, "--json")
    if args.nanogpt and importlib.util.find_spec("tiktoken") is None:
        refuse("--nanogpt: nanoGPT's sample.py imports tiktoken, which this Python lacks; pip install tiktoken")
    if args.llama_bench and args.process_shapes and not is_program(llama_completion(args.llama_bench)):
        refuse(f"--llama-bench {args.llama_bench}: no llama-completion beside it, for the whole-process rows; build "
               "it too (cmake --build ... --target llama-completion) or pass --process-shapes ''")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"{args.tokens} tokens, {args.rounds} rounds", flush=True)
    rows, processes = [], []
    with tempfile.TemporaryDirectory(prefix="bench-runtimes-") as work:
        for shape in args.shapes:
            files = make_files(shape, Path(work))
            for threads in args.threads:
                measured = measure_shape(shape, files, args, threads)
                print(table(measured), flush=True)
                rows += measured
                if shape in args.process_shapes:
                    timed = whole_processes(shape, files, args, threads)
                    print(process_table(timed), flush=True)
                    processes += timed
    print(table(rows))
    print(process_table(processes))
    if json_path:
        atomic_write_bytes(json_path, (json.dumps({"decode": rows, "processes": processes}, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
