"""A training beside another job on the same cores: how OpenMP's wait policy changes the wall time.

    python bench/bench_shared_node.py                                  # the quick start's model, 60 steps
    python bench/bench_shared_node.py --train "--config cpu train.max_iters=100" --rounds 5

Torch's OpenMP threads (libgomp) spin while they wait for work, by default for about 300,000
iterations. On a quiet machine that saves a sleep and a wake-up per parallel region; beside
another job, two spinning processes burn each other's time slices. Each round runs
`gptcore train` once per wait setting, quiet and then beside a neighbour: another training (the
`cpu` preset on as many threads as this process may use CPUs, with libgomp's default spinning, as
another user's job would run). The order of the settings alternates from round to round. Every
run is a whole process, timed from start to exit. "gptcore's choice" sets nothing, so that
gptcore.cluster.spinning picks the wait as it does for a user.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from harness import REPO, spread
from arguments import BenchParser, at_least, known_config, listed, one_of

from gptcore.cpus import usable_cpus

# The wait settings compared: the environment each training runs with.
SETTINGS = {
    "GOMP_SPINCOUNT=300000 (libgomp's default)": {"GOMP_SPINCOUNT": "300000"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "gptcore's choice (gptcore.cluster.spinning)": {},
}
WAIT_VARIABLES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def clean_env(extra: dict) -> dict:
    """This environment with EXTRA as its only wait setting."""
    env = {key: value for key, value in os.environ.items() if key not in WAIT_VARIABLES}
    return {**env, **extra}


def train_arguments(text: str) -> list[str]:
    """An argparse type: `gptcore train`'s arguments, whose config loads."""
    from gptcore.cli import build_parser
    from gptcore.errors import UserInputError

    try:
        arguments = shlex.split(text)
        parsed = build_parser().parse_args(["train", *arguments])
    except (UserInputError, ValueError) as err:  # ValueError: shlex's unclosed quote
        raise argparse.ArgumentTypeError(str(err)) from None
    known_config(parsed.config, parsed.overrides)
    return arguments


def timed_train(train_args: list[str], extra: dict) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "gptcore", "train", *train_args, f"out_dir={tmp}/run",
                               "train.sample_tokens=0"], cwd=REPO, env=clean_env(extra), stdout=subprocess.DEVNULL)
        if done.returncode:
            sys.exit(f"bench_shared_node: gptcore train {shlex.join(train_args)} failed (its error is above)")
        return time.perf_counter() - start


def main() -> None:
    parser = BenchParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=train_arguments, default="--config fast train.max_iters=60",
                        help="gptcore train arguments")
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--settings", type=listed(one_of(*SETTINGS)), default=",".join(SETTINGS),
                        help="comma-separated, from the names above")
    args = parser.parse_args()
    train_args, names = args.train, args.settings
    threads = usable_cpus()
    times = {(name, where): [] for name in names for where in ("quiet", "beside")}
    for round_ in range(args.rounds):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            times[name, "quiet"].append(timed_train(train_args, SETTINGS[name]))
            neighbour_dir = tempfile.mkdtemp(prefix="neighbour-")
            neighbour = subprocess.Popen(
                [sys.executable, "-m", "gptcore", "train", "--config", "cpu", "train.max_iters=1000000",
                 f"out_dir={neighbour_dir}", "profile.sampler=false", "log.tensorboard=false"],
                cwd=REPO, env=clean_env({"GOMP_SPINCOUNT": "300000", "OMP_NUM_THREADS": str(threads)}),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(8)  # set up and training
                times[name, "beside"].append(timed_train(train_args, SETTINGS[name]))
            finally:
                neighbour.kill()
                neighbour.wait()
                shutil.rmtree(neighbour_dir)
            print(f"round {round_ + 1}: {name}: quiet {times[name, 'quiet'][-1]:.1f} s, "
                  f"beside {times[name, 'beside'][-1]:.1f} s", file=sys.stderr, flush=True)
    base = statistics.median(times[names[0], "quiet"])
    print(f"`gptcore train {shlex.join(args.train)}`, whole process, {args.rounds} rounds; the neighbour: `gptcore train "
          f"--config cpu` on {threads} thread(s), libgomp's default spinning\n")
    print("| wait setting | quiet s | vs default quiet | beside a job s | beside / quiet |")
    print("|---|---|---|---|---|")
    for name in names:
        quiet, beside = statistics.median(times[name, "quiet"]), statistics.median(times[name, "beside"])
        print(f"| {name} | {spread(times[name, 'quiet'])} | {quiet / base:.2f}x | {spread(times[name, 'beside'])} | "
              f"{beside / quiet:.2f}x |")


if __name__ == "__main__":
    main()
