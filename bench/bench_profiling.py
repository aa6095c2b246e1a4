"""What profiling costs: step time with cProfile, with the hardware sampler, without phase timers.

    python bench/bench_profiling.py                          # small shape, 2 threads, 3 clean rounds
    python bench/bench_profiling.py --shape tiny --rounds 5

Every variant trains the same model from the same seed in this one process, interleaved round by
round (base, cprofile, sampler, ... then again, each round starting one variant later), so that
a change in the machine's load hits all of them alike. Each variant's figure is the median ms/step
over its logged windows after warm-up, pooled over the clean rounds; the overhead is its ratio to
the base (phase timers on, nothing else). The sampler variants sample every second, one with a
fake nvidia-smi on PATH (a shell script printing 4 GPUs) to count the cost of the subprocess.

Other work on the machine distorts everything (two threads that lose a core wait for each other),
so before each round the 1-minute load average must fall below --max-load, the CPU that other
processes take during each run is measured, and a round in which they took more than
--max-others % is thrown away and run again. The load, the clean rounds' figures and the
discarded rounds are printed with the results."""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import psutil
import torch

from harness import OthersCpu, wait_for_quiet  # noqa: E402  (puts the checkout on sys.path)
from arguments import BenchParser, at_least, non_negative_number, thread_count

from analysis.scaling import steady_records  # noqa: E402
from gptcore.config import load_config  # noqa: E402
from gptcore.telemetry.metrics import read_metrics  # noqa: E402
from gptcore.training.train import Trainer  # noqa: E402
from shapes import data_path, overrides  # noqa: E402

SHAPES = {  # small: the nanoGPT-comparable shape of bench_train.py; tiny: the test config
    "small": overrides("small"),
    "tiny": ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.batch_size=8"],
}
VARIANTS = {
    "base": ["profile.sampler=false"],
    "no phase timers": ["profile.sampler=false", "profile.phases=false"],
    "cprofile": ["profile.sampler=false", "profile.cprofile=true"],
    "sampler": ["profile.sampler=true"],
    "sampler + nvidia-smi": ["profile.sampler=true"],
}
FAKE_NVIDIA_SMI = "#!/bin/sh\n" + "".join(
    f'echo "{i}, 87, 31245, 81559, 312.45, 64"\n' for i in range(4))


@contextlib.contextmanager
def first_on_path(directory: Path | None):
    """PATH with directory (the fake nvidia-smi's) in front, if given, for the duration."""
    saved_path = os.environ["PATH"]
    if directory:
        os.environ["PATH"] = f"{directory}:{saved_path}"
    try:
        yield
    finally:
        os.environ["PATH"] = saved_path


def train_once(shape: str, extra: list[str], steps: int, threads: int, fake_bin: Path | None) -> tuple[list[float], float]:
    """(ms/step of each steady window, CPU % used by other processes meanwhile)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, SHAPES[shape] + [
            f"data.path={data_path()}", f"out_dir={tmp}/run", f"train.max_iters={steps}", "train.log_interval=5",
            f"train.eval_interval={steps}", "train.eval_iters=1", "model.dropout=0.0", "train.sample_tokens=0",
            f"train.threads={threads}", "train.warmup_iters=10"] + extra)
        with OthersCpu() as others, first_on_path(fake_bin), contextlib.redirect_stdout(io.StringIO()):
            Trainer(config).run()  # (its progress lines are not wanted here)
        records = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    return [r["ms_per_step"] for r in steady_records(records, warmup_fraction=0.2)], others.pct


def sample_cost_ms(fake_bin: Path | None, samples: int = 100) -> float:
    """CPU milliseconds one sample takes, this process and its nvidia-smi child together: what
    the sampler takes from training once per interval, measured directly rather than as a
    difference of noisy step times."""
    from gptcore.telemetry.sampler import Sampler

    with first_on_path(fake_bin), tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        sampler = Sampler(Path(tmp), node_rank=0)
        sampler.processes = [(0, psutil.Process())]
        sampler.sample()
        before = cpu_seconds()
        for _ in range(samples):
            sampler.sample()
        spent = cpu_seconds() - before
    return 1000 * spent / samples


def cpu_seconds() -> float:
    """User + system CPU of this process and its finished children (microsecond resolution)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_round(names: list[str], shape: str, steps: int, threads: int, fake_bin: Path) -> tuple[dict, float]:
    """({variant: steady windows}, the most CPU other processes took during any of its runs)."""
    windows, busiest = {}, 0.0
    for name in names:
        windows[name], others = train_once(shape, VARIANTS[name], steps, threads,
                                           fake_bin if "nvidia-smi" in name else None)
        busiest = max(busiest, others)
    return windows, busiest


def main() -> None:
    parser = BenchParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--rounds", type=at_least(1), default=3, help="clean rounds to collect")
    parser.add_argument("--steps", type=at_least(0), default=0, help="steps per run (default: 60 small, 400 tiny)")
    parser.add_argument("--threads", type=thread_count(1), default=2)
    parser.add_argument("--max-load", type=non_negative_number, default=1.0, help="wait for a lower 1-min load average first")
    parser.add_argument("--max-others", type=non_negative_number, default=20.0,
                        help="a round in which other processes took more CPU %% than this is run again")
    parser.add_argument("--max-attempts", type=at_least(1), default=12)
    args = parser.parse_args()
    steps = args.steps or (60 if args.shape == "small" else 400)
    torch.set_num_threads(args.threads)
    names = list(VARIANTS)
    clean, discarded, loads = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        fake_bin = Path(tmp)
        (fake_bin / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
        (fake_bin / "nvidia-smi").chmod(0o755)
        costs = {"sampler": sample_cost_ms(None), "sampler + nvidia-smi": sample_cost_ms(fake_bin)}
        for attempt in range(args.max_attempts):
            if len(clean) == args.rounds:
                break
            loads.append(round(wait_for_quiet(args.max_load, timeout_s=120), 2))
            shift = attempt % len(names)  # no variant always runs first
            windows, busiest = run_round(names[shift:] + names[:shift], args.shape, steps, args.threads, fake_bin)
            (clean if busiest <= args.max_others else discarded).append((windows, round(busiest, 1)))
    if not clean:
        sys.exit(f"bench_profiling: every round ran on a loaded machine (others' CPU %: "
                 f"{[busy for _, busy in discarded]}); try again when it is quieter")
    pooled = {name: [ms for windows, _ in clean for ms in windows[name]] for name in names}
    base = statistics.median(pooled["base"])
    for name in names:
        median = statistics.median(pooled[name])
        print(json.dumps({"shape": args.shape, "threads": args.threads, "variant": name,
                          "median_ms_per_step": round(median, 2), "vs_base": round(median / base, 4),
                          "per_round_medians": [round(statistics.median(w[name]), 2) for w, _ in clean]}))
    for name, cost in costs.items():
        print(json.dumps({"variant": name, "cpu_ms_per_sample": round(cost, 2),
                          "share_of_machine_at_1s": round(cost / 1000 / psutil.cpu_count(), 5)}))
    print(json.dumps({"clean_rounds": len(clean), "others_cpu_pct_in_clean_rounds": [busy for _, busy in clean],
                      "discarded_rounds_others_cpu_pct": [busy for _, busy in discarded],
                      "load_avg_1m_before_rounds": loads, "cpus": psutil.cpu_count()}))


if __name__ == "__main__":
    main()
