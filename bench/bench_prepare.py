"""`gptcore prepare` on a generated corpus: MB/s by worker count, and peak memory.

    python bench/bench_prepare.py --gb 2 --dir /scratch/me             # 1 and 2 workers, 2 rounds
    python bench/bench_prepare.py --gb 2 --limit-mb 250                  # also under ulimit -v 250 MB
    python bench/bench_prepare.py --gb 0.2 --reference-src /tmp/old      # and an older checkout's prepare

The corpus is pseudo-English lines (a fixed seed), written once into --dir. Each run is a real
`python -m gptcore prepare` process; its memory is sampled every 20 ms from /proc: the peak RSS of
the main process, of the largest worker, and of all of them added (shared pages counted in each,
so the sum is an upper bound). Rounds alternate the worker counts, so drifting load hits them
alike; each row is the median and range over rounds. --reference-src runs the prepare of another
checkout (PYTHONPATH) on the same file, once per round as well.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from harness import REPO, spread
from arguments import BenchParser, at_least, checkout, listed, output_path, positive_number, refuse

WORDS = ("the king and queen walk to the castle while a fool sings of love and war , my lord speaks "
         "softly to the night ; what light through yonder window breaks ? all the world is a stage "
         "and men and women merely players ! honey near green stones wild trees whisper").split()


def write_corpus(path: Path, size: int) -> None:
    """size bytes of lines of random words: 64 MB of distinct lines, repeated in shifted order."""
    rng = random.Random(0)
    lines, total = [], 0
    while total < 64 * 2**20:
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))).capitalize() + "\n")
        total += len(lines[-1])
    block = "".join(lines).encode()
    written = 0
    with open(path, "wb") as handle:
        while written < size:
            shift = rng.randrange(len(block) // 2)
            piece = (block[shift:] + block[:shift])[: size - written]
            handle.write(piece)
            written += len(piece)


def busy_core_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measured_run(command: list[str], env: dict, cwd: Path = REPO) -> dict:
    """Wall time and peak memory of a command and its children, sampled every 20 ms, and the CPU
    that other processes used meanwhile (% of one core: the machine's busy time less ours)."""
    start, busy, ours = time.perf_counter(), busy_core_seconds(), children_cpu_seconds()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(process.pid)
    peak_main = peak_worker = peak_sum = 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            rss = {p.pid: p.memory_info().rss for p in tree}
        except psutil.Error:
            continue
        main = rss.pop(process.pid, 0)
        peak_main, peak_sum = max(peak_main, main), max(peak_sum, main + sum(rss.values()))
        peak_worker = max(peak_worker, max(rss.values(), default=0))
        time.sleep(0.02)
    out, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"bench_prepare: {' '.join(command)} failed: {err.strip()[-500:]}")
    seconds = time.perf_counter() - start
    others = (busy_core_seconds() - busy) - (children_cpu_seconds() - ours)
    return {"seconds": seconds, "main_mb": peak_main / 2**20, "worker_mb": peak_worker / 2**20,
            "sum_mb": peak_sum / 2**20, "others_pct": max(0.0, 100 * others / seconds)}


def check_space(work: Path, size: int, variants: int) -> None:
    """Refused before anything is written: the corpus and each variant's tokens (a byte per
    character of this corpus) must fit on the disk that holds WORK."""
    corpus = work / "corpus.txt"
    kept = corpus.stat().st_size if corpus.is_file() and corpus.stat().st_size == size else 0  # reused
    where = next(parent for parent in [work, *work.parents] if parent.exists())
    need, free = size * (1 + variants) - kept, shutil.disk_usage(where).free
    if need > free:
        refuse(f"--gb {size / 1e9:g} needs {need / 1e9:.1f} GB in {where} (the corpus and {variants} prepared "
               f"copies) and {free / 1e9:.1f} GB are free; pass a smaller --gb or another --dir")


def main() -> int:
    parser = BenchParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=positive_number, default=2.0, help="corpus size in GB (1e9 bytes)")
    parser.add_argument("--dir", default=None, help="where the corpus and outputs go (default: a temporary one)")
    parser.add_argument("--workers", type=listed(at_least(1)), default=[1, 2])
    parser.add_argument("--rounds", type=at_least(1), default=2)
    parser.add_argument("--limit-mb", type=at_least(0), default=0, help="also one run per worker count under ulimit -v")
    parser.add_argument("--reference-src", type=checkout(("gptcore/__main__.py",), "a gptcore checkout"), default=None,
                        help="an older checkout whose prepare runs for comparison")
    args = parser.parse_args()
    size = int(args.gb * 1e9)
    work = output_path(args.dir, "--dir", directory=True)
    check_space(work or Path(tempfile.gettempdir()), size, len(args.workers) + bool(args.reference_src))
    work = work or Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    if not corpus.is_file() or corpus.stat().st_size != size:
        write_corpus(corpus, size)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    variants = {f"{w} worker(s)": ([sys.executable, "-m", "gptcore", "prepare", "--data", str(corpus), "--out",
                                    str(work / f"out-{w}"), "--workers", str(w)], env, REPO)
                for w in args.workers}
    if args.reference_src:  # run from inside it, so that `-m gptcore` is that checkout's
        variants["reference checkout"] = ([sys.executable, "-m", "gptcore", "prepare", "--data", str(corpus), "--out",
                                           str(work / "out-ref")], {**env, "PYTHONPATH": str(args.reference_src)},
                                          args.reference_src)
    results = {name: [] for name in variants}
    print(f"corpus {size / 1e9:.2f} GB, {psutil.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}", flush=True)
    for k in range(args.rounds):
        order = list(variants) if k % 2 == 0 else list(variants)[::-1]
        for name in order:
            run = measured_run(*variants[name])
            results[name].append(run)
            print(f"round {k + 1} {name}: {size / 1e6 / run['seconds']:.1f} MB/s, peak RSS main {run['main_mb']:.0f} MB, "
                  f"largest worker {run['worker_mb']:.0f} MB, all {run['sum_mb']:.0f} MB, others' CPU "
                  f"{run['others_pct']:.0f}% of a core", flush=True)
    print("\n| variant | MB/s | peak RSS main MB | largest worker MB | all processes MB |\n|---|---|---|---|---|")
    for name, runs in results.items():
        print(f"| {name} | {spread([size / 1e6 / r['seconds'] for r in runs])} | {spread([r['main_mb'] for r in runs])} "
              f"| {spread([r['worker_mb'] for r in runs])} | {spread([r['sum_mb'] for r in runs])} |")
    if args.limit_mb:
        for w in args.workers:
            script = f"ulimit -v {args.limit_mb * 1024} && exec {' '.join(variants[f'{w} worker(s)'][0])}"
            run = measured_run(["bash", "-c", script], env)
            print(f"under ulimit -v {args.limit_mb} MB, {w} worker(s): done, {size / 1e6 / run['seconds']:.1f} MB/s, "
                  f"peak RSS main {run['main_mb']:.0f} MB, largest worker {run['worker_mb']:.0f} MB")
    if not args.dir:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
