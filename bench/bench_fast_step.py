"""The `fast` preset's eager training step on the CPU with ReLU² through autograd and through
`gpt.ReLUSquared`, in one process:

    python bench/bench_fast_step.py                   # 10 rounds of 10 steps, 2 threads

- `autograd relu2`: the model with ReLU² as `relu(h).square()` through autograd (the model's
  before `ReLUSquared`: four passes over the MLP's activations in the backward, not two);
- `ReLUSquared`: the model as it is.

Each variant is a trainer's parts (`training.parts.compose`: data, model, optimizer, autocast as
`gptcore train` builds them) stepped by `training.step.train_step`; the rounds alternate the
variants' order, so drifting load falls on both, and the ratio is taken per round. Both start from
the same weights and batches, and their losses are checked to be the same, bit for bit.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from harness import REPO, spread  # noqa: F401  (puts the checkout on sys.path)
from arguments import BenchParser, at_least, known_config, thread_count

VARIANTS = ("autograd relu2", "ReLUSquared")


@contextmanager
def autograd_relu2():
    """The model's ReLU² taken by autograd from relu(h).square(), for as long as the block runs."""
    import torch.nn.functional as F

    from gptcore.models import gpt

    fused = gpt.ReLUSquared

    class Autograd:
        apply = staticmethod(lambda h: F.relu(h).square())

    gpt.ReLUSquared = Autograd
    try:
        yield
    finally:
        gpt.ReLUSquared = fused


def main() -> None:
    parser = BenchParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", type=known_config, default="fast")
    parser.add_argument("--rounds", type=at_least(1), default=10)
    parser.add_argument("--steps", type=at_least(1), default=10, help="steps per variant per round")
    parser.add_argument("--threads", type=thread_count(1), default=2)
    args = parser.parse_args()
    import torch

    from gptcore.cluster import distributed
    from gptcore.config import load_config
    from gptcore.telemetry.profiling import PhaseTimer
    from gptcore.training.parts import compose
    from gptcore.training.rundir import RunLock
    from gptcore.training.step import train_step

    tmp = Path(tempfile.mkdtemp(prefix="bench-fast-step-"))
    timer = PhaseTimer(torch.device("cpu"), enabled=False)
    parts, times, losses = {}, {name: [] for name in VARIANTS}, {name: [] for name in VARIANTS}
    for name in VARIANTS:
        config = load_config(args.preset, [f"out_dir={tmp / name.replace(' ', '-')}", "train.device=cpu",
                                           f"train.threads={args.threads}", "log.tensorboard=false"])
        parts[name] = compose(config, distributed.read_contract(), RunLock(Path(config.out_dir)), lambda line: None)
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name in (VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]):
            with autograd_relu2() if name == "autograd relu2" else nullcontext():
                start = time.perf_counter()
                for step in range(round_ * args.steps, (round_ + 1) * args.steps):
                    loss, _, _ = train_step(parts[name], step, timer)
                    losses[name].append(loss.item())
                if round_:
                    times[name].append((time.perf_counter() - start) / args.steps * 1000)
    shutil.rmtree(tmp, ignore_errors=True)
    same = "the same" if losses["autograd relu2"] == losses["ReLUSquared"] else "DIFFERENT"
    print(f"{args.preset} preset, {torch.get_num_threads()} threads, torch {torch.__version__}; {args.rounds} "
          f"rounds x {args.steps} steps after one to warm up; the losses of all {len(losses['ReLUSquared'])} "
          f"steps: {same}")
    print("\n| ReLU² | ms/step, median (min-max) | autograd's time over this, per round |\n|---|---|---|")
    for name in VARIANTS:
        ratios = [a / t for a, t in zip(times["autograd relu2"], times[name])]
        print(f"| {name} | {spread(times[name])} | {spread(ratios)}x |")


if __name__ == "__main__":
    main()
