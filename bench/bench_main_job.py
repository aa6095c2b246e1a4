"""The README's main job as a user runs it, one preset against another: wall time and the model it gives.

    python bench/bench_main_job.py                          # cpu against fast, 3 rounds, default corpus
    python bench/bench_main_job.py --presets cpu,fast --rounds 5
    python bench/bench_main_job.py --presets fast,fast:train.compile=true   # an arm with overrides

Each round runs `gptcore train --config PRESET` for every preset as a whole process, alternating
which goes first, and times it from start to exit (start-up, evaluations and the final sample
included: what the user waits for). An arm PRESET:KEY=VALUE[:KEY=VALUE...] adds overrides. Every
run starts with an empty torch.compile cache, as a user's first run does. The model is then
measured apart, untimed: the validation loss over the whole validation split (bench_time_to_loss's
measure). The verdict compares the presets' losses and wall times with Welch's t-test.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO
from arguments import BenchParser, at_least, data_source, known_config, listed

from bench_time_to_loss import mean_std, welch


def full_val_loss(run_dir: Path) -> float:
    """The whole validation split through the run's final checkpoint (in this process, untimed)."""
    import torch

    from gptcore.data.batches import Batches
    from gptcore.inference.generate import eval_data, load_model
    from gptcore.training.evaluation import evaluate_full
    from gptcore.training.setup import autocast_context, autocast_dtype

    loaded = load_model(run_dir / "ckpt.pt", "cpu")
    with tempfile.TemporaryDirectory() as scratch:  # the run's data: beside it, or its named corpus
        batches = Batches(eval_data(loaded, None, Path(scratch)), loaded.config.model.block_size, seed=0)
        cpu = torch.device("cpu")
        autocast = autocast_context(autocast_dtype(loaded.config, cpu), cpu)  # as the run trained and evaluated
        return evaluate_full(loaded.model, batches, "val", 64, autocast)


def arm_type(text: str) -> str:
    """An argparse type: PRESET[:KEY=VALUE...], whose config loads."""
    name, *overrides = text.split(":")
    known_config(name, overrides)
    return text


def run(arm: str, data: str, tmp: Path, round_: int) -> dict:
    preset, *overrides = arm.split(":")
    out = tmp / f"{arm.replace(':', '+').replace('=', '-')}-{round_}"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(out) + "-inductor"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gptcore", "train", "--config", preset, f"out_dir={out}",
                           f"data.path={data}", "log.tensorboard=false", *overrides], cwd=REPO, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"bench_main_job: {arm} failed:\n{done.stderr[-2000:]}")
    best = float(re.search(r"best val loss ([0-9.]+)", done.stdout).group(1))
    return {"wall_s": wall, "best_val": best, "full_val": full_val_loss(out)}


def main() -> None:
    parser = BenchParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", type=listed(arm_type), default=["cpu", "fast"],
                        help="comma-separated arms, PRESET[:KEY=VALUE...] each")
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--data", type=data_source, default="shakespeare")
    args = parser.parse_args()
    presets = args.presets
    results: dict[str, list[dict]] = {preset: [] for preset in presets}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = presets[round_ % len(presets):] + presets[:round_ % len(presets)]
            for preset in order:
                result = run(preset, args.data, Path(tmp), round_)
                results[preset].append(result)
                print(f"round {round_} {preset}: {result['wall_s']:.0f} s, best val (trainer's) "
                      f"{result['best_val']:.4f}, full val {result['full_val']:.4f}", flush=True)
    print("\n| preset | wall s | best val (trainer's 20 batches) | full validation loss |\n|---|---|---|---|")
    for preset, runs in results.items():
        print(f"| {preset} | {mean_std([r['wall_s'] for r in runs])} | {mean_std([r['best_val'] for r in runs], 4)} | "
              f"{mean_std([r['full_val'] for r in runs], 4)} |")
    if len(presets) == 2 and args.rounds >= 2:
        a, b = (results[p] for p in presets)
        for key in ("full_val", "wall_s"):
            t, p = welch([r[key] for r in b], [r[key] for r in a])
            print(f"{presets[1]} - {presets[0]} {key}: {statistics.mean(r[key] for r in b) - statistics.mean(r[key] for r in a):+.4f} "
                  f"(Welch t = {t:.2f}, p = {p:.2g})")


if __name__ == "__main__":
    main()
