"""Weak-scaling efficiency of data-parallel training on CPU ranks, and what DDP costs per step.

    python bench/bench_ddp.py                          # 1 rank vs 2 gloo ranks, 1 thread each
    python bench/bench_ddp.py --ranks 2 --steps 150 --repeats 3 --batch 32
    python bench/bench_ddp.py --hook-cost --repeats 6       # the all-reduce timing hook on, then off
    python bench/bench_ddp.py --fsdp --repeats 6            # train.parallel=fsdp, then ddp

Every configuration is a real training run, `gptcore train` for 1 rank (no process group, no DDP
wrapper) and `torchrun --nproc-per-node=N -m gptcore train` for N ranks, under weak scaling: each
rank gets the same batch, so an ideal N-rank step takes as long as a 1-rank step.
  efficiency  = t(1 rank) / t(row), from the median ms/step of the logged windows after warm-up
  N x 1       = N unconnected 1-rank runs at once: what N processes sharing the machine cost
                without any communication
  DDP cost    = t(N ranks) - t(N x 1) per step, split by phase (rank 0's timers): the gradient
                all-reduce runs inside backward, the loss all-reduce (log steps) and the preemption vote
                (in the background) between steps
  all-reduce  = one gloo all_reduce of the model's gradient size between N idle ranks: the part of
                the DDP cost that is communication; the rest is waiting for the slower rank and
                copying gradients in and out of DDP's buckets
  --hook-cost = N-rank DDP with the all-reduce timing hook (profile.comm=true, the default) and
                without it (DDP's own all-reduce), alternating which goes first round by round
  --fsdp      = N-rank FSDP against N-rank DDP, alternating the same way
Other work on the machine skews this; the load average is printed before and after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from arguments import BenchParser, at_least, listed
from shapes import REPO, data_path, model_overrides

from gptcore.telemetry.metrics import read_metrics
from gptcore.telemetry.profiling import STEP_PHASES

# bench_train.py's small shape (~0.8M parameters), 12 x 64 tokens per rank and step by default.
SHAPE = [*model_overrides("small"), "model.dropout=0.0", "train.scaling=weak"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def command(ranks: int, batch: int, steps: int, log_every: int, out_dir: Path, extra=()) -> list[str]:
    overrides = [*SHAPE, f"train.batch_size={batch}", f"data.path={data_path()}", f"out_dir={out_dir}",
                 f"train.max_iters={steps}", "train.warmup_iters=10", f"train.log_interval={log_every}",
                 f"train.eval_interval={10 * steps}", "train.eval_iters=1", "train.sample_tokens=0",
                 "train.threads=1", "profile.sampler=false", *extra]
    launcher = [*TORCHRUN, f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable]
    return [*launcher, "-m", "gptcore", "train", *overrides]


def timings(out_dir: Path, warmup: int, steps: int) -> dict:
    records = read_metrics(out_dir / "metrics.jsonl")
    windows = [r for r in records if "loss" in r and warmup < r["step"] < steps]
    phases = {name: statistics.median(r["phases_ms"][name] for r in windows) for name in STEP_PHASES}
    ms = statistics.median(r["ms_per_step"] for r in windows)
    phases["other"] = ms - sum(phases.values())
    return {"ms_per_step": ms, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in windows),
            "phases_ms": phases, "windows": len(windows)}


def train(ranks: int, copies: int, args, out_dir: Path, extra=()) -> dict:
    """One N-rank run, or `copies` independent 1-rank runs at once (ranks=1): what sharing the
    machine costs without any communication. Times of independent copies are averaged."""
    before = load()
    runs = [subprocess.Popen(command(ranks, args.batch, args.steps, args.log_every, out_dir / str(k), extra), cwd=REPO,
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for k in range(copies)]
    for run in runs:
        _, err = run.communicate(timeout=1800)
        if run.returncode != 0:
            raise SystemExit(f"bench_ddp: {ranks}-rank run failed:\n{err[-2000:]}")
    each = [timings(out_dir / str(k), args.warmup, args.steps) for k in range(copies)]
    mean = {"ms_per_step": statistics.mean(t["ms_per_step"] for t in each),
            "tokens_per_s": sum(t["tokens_per_s"] for t in each), "windows": each[0]["windows"],
            "phases_ms": {p: statistics.mean(t["phases_ms"][p] for t in each) for p in (*STEP_PHASES, "other")}}
    label = f"{ranks} (DDP)" if ranks > 1 else ("1" if copies == 1 else f"{copies} x 1, independent")
    return {"label": label, "ranks": ranks * copies, **mean, "load_before": before, "load_after": load()}


def gradient_numel(run_dir: Path) -> int:
    import torch

    state = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    return sum(t.numel() for t in state["model"].values() if t.is_floating_point())


def allreduce_worker(numel: int, iters: int = 60) -> None:
    """Runs under torchrun: rank 0 prints the median all_reduce time of `numel` floats as JSON."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    tensor, times = torch.ones(numel), []
    for _ in range(iters):
        start = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(1000 * (time.perf_counter() - start))
    if dist.get_rank() == 0:
        print(json.dumps({"allreduce_ms": statistics.median(times[iters // 5:])}))
    dist.destroy_process_group()


def allreduce_ms(ranks: int, numel: int) -> float:
    result = subprocess.run([*TORCHRUN, f"--nproc-per-node={ranks}", __file__, "--allreduce-worker", str(numel)],
                            cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"bench_ddp: all_reduce run failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["allreduce_ms"]


def main() -> int:
    parser = BenchParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=listed(at_least(1)), default=[2], help="comma-separated rank counts, each compared with 1 rank")
    parser.add_argument("--batch", type=at_least(1), default=12, help="rows of 64 tokens per rank and step")
    parser.add_argument("--steps", type=at_least(1), default=120)
    parser.add_argument("--warmup", type=at_least(0), default=20, help="steps left out of the medians")
    parser.add_argument("--log-every", type=at_least(1), default=5, help="steps per timed window")
    parser.add_argument("--repeats", type=at_least(1), default=1, help="rounds over all rows; each row's median counts")
    parser.add_argument("--hook-cost", action="store_true", help="time DDP with and without the all-reduce timing hook")
    parser.add_argument("--fsdp", action="store_true", help="time train.parallel=fsdp against ddp on the same ranks")
    parser.add_argument("--allreduce-worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.allreduce_worker:
        allreduce_worker(args.allreduce_worker)
        return 0
    for flag, (what, variants) in PAIRS.items():
        if getattr(args, flag):
            return compare_pair(args, what, variants)
    counts = args.ranks
    # The 1-rank baseline, then for each N: N independent 1-rank runs, then N ranks with DDP.
    plan = [(1, 1)] + [plan for n in counts if n > 1 for plan in ((1, n), (n, 1))]
    # Rounds go through the whole plan, so that drifting load from elsewhere hits every row alike;
    # each row keeps its median round.
    tries = {entry: [] for entry in plan}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            for ranks, copies in plan:
                tries[ranks, copies].append(train(ranks, copies, args, Path(tmp) / f"r{ranks}x{copies}-{k}"))
                print(json.dumps(tries[ranks, copies][-1]), file=sys.stderr, flush=True)
        numel = gradient_numel(Path(tmp) / "r1x1-0" / "0")
    results = [sorted(runs, key=lambda r: r["ms_per_step"])[len(runs) // 2] for runs in tries.values()]
    base = results[0]
    print(f"Weak scaling, 4 layers x 4 heads x 128, block 64, batch {args.batch} per rank, 1 thread per rank; "
          f"median of {base['windows']} windows x {args.log_every} steps after {args.warmup} warm-up steps, "
          f"median of {args.repeats} rounds\n")
    header = ["ranks", "ms/step", "tokens/s (all ranks)", "efficiency", *[f"{p} ms" for p in (*STEP_PHASES, "other")],
              "load before / after"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in results:
        cells = [r["label"], f"{r['ms_per_step']:.1f}", f"{r['tokens_per_s']:,.0f}",
                 f"{base['ms_per_step'] / r['ms_per_step']:.1%}",
                 *[f"{r['phases_ms'][p]:.1f}" for p in (*STEP_PHASES, "other")],
                 f"{r['load_before']} / {r['load_after']}"]
        print("| " + " | ".join(cells) + " |")
    for shared, ddp in zip(results[1::2], results[2::2]):
        sharing = shared["ms_per_step"] - base["ms_per_step"]
        extra = ddp["ms_per_step"] - shared["ms_per_step"]
        split = ", ".join(f"{p} {ddp['phases_ms'][p] - shared['phases_ms'][p]:+.1f}" for p in (*STEP_PHASES, "other"))
        print(f"\n{ddp['ranks']} ranks: {ddp['ms_per_step'] - base['ms_per_step']:+.1f} ms/step over 1 rank = "
              f"{sharing:+.1f} ms from {ddp['ranks']} processes sharing the machine (independent runs) "
              f"{extra:+.1f} ms of DDP ({split}); one all_reduce of the {numel:,} gradient floats between "
              f"idle ranks takes {allreduce_ms(ddp['ranks'], numel):.2f} ms")
    return 0


# Pairs of N-rank runs that differ in one setting, timed against each other (the first over the second).
PAIRS = {
    "hook_cost": ("the all-reduce timing hook", {"hook": ["profile.comm=true"], "no hook": ["profile.comm=false"]}),
    "fsdp": ("FSDP against DDP", {"fsdp": ["train.parallel=fsdp"], "ddp": ["train.parallel=ddp"]}),
}


def compare_pair(args, what: str, variants: dict) -> int:
    """N-rank step time of two variants, rounds alternating which goes first."""
    ranks = args.ranks[0]
    medians = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            for name in (list(variants) if k % 2 == 0 else list(variants)[::-1]):
                run = train(ranks, 1, args, Path(tmp) / f"{name}-{k}".replace(" ", "_"), variants[name])
                medians[name].append(run["ms_per_step"])
                print(json.dumps({"variant": name, **run}), file=sys.stderr, flush=True)
    (first, a), (second, b) = ((name, statistics.median(medians[name])) for name in variants)
    spread = {name: f"{min(v):.1f}-{max(v):.1f}" for name, v in medians.items()}
    ratios = [x / y for x, y in zip(medians[first], medians[second])]
    print(f"{what}: {ranks} gloo ranks, batch {args.batch} per rank, {args.repeats} rounds: {first} {a:.2f} ms/step "
          f"(rounds {spread[first]}), {second} {b:.2f} ({spread[second]}): {a / b:.3f}x (per round "
          f"{min(ratios):.3f}-{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
