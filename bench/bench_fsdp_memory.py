"""What one rank holds under DDP and under FSDP: weights, gradients and AdamW state, exact from
the rank's own tensors after a real training step on gloo ranks.

    python bench/bench_fsdp_memory.py                                # seed and large, 1 / 2 / 4 / 8 ranks
    python bench/bench_fsdp_memory.py --configs large --ranks 1,2 --strategies fsdp

Each (config, strategy, ranks) is one torchrun of N CPU ranks: the preset's model is built,
made data-parallel by gptcore.cluster.parallel.parallelize as training does, given one forward and
backward on a 16-token batch and one AdamW step, then gptcore.cluster.parallel.state_bytes counts what
the rank's tensors hold (its shards under FSDP). The sequence is short so that the step is quick;
the state does not depend on it. Rank 0's figures are printed (ranks differ by at most a row of
each sharded tensor).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from harness import REPO
from arguments import BenchParser, at_least, known_config, listed, one_of

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
VOCAB = 96  # a character vocabulary the size of the shipped corpus's


def worker(config_name: str, strategy: str) -> None:
    """Runs under torchrun: rank 0 prints one JSON line."""
    import torch
    import torch.distributed as dist

    from gptcore.cluster import distributed
    from gptcore.cluster.parallel import parallelize, state_bytes
    from gptcore.config import load_config
    from gptcore.models.gpt import GPT, parameter_count
    from gptcore.models.optim import make_optimizer

    torch.set_num_threads(1)
    config = load_config(config_name, [f"train.parallel={strategy}"])
    config.model.vocab_size = VOCAB
    contract = distributed.read_contract()
    device = torch.device("cpu")
    distributed.init_process_group(contract, device, 600, single_rank=True)
    torch.manual_seed(0)
    model = GPT(config.model)
    parallel = parallelize(model, device, strategy, compile_model=False)
    optimizer = make_optimizer(model, config)
    tokens = torch.randint(0, VOCAB, (1, 17))
    _, loss = parallel.compute_model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    held = state_bytes(model, optimizer)
    if dist.get_rank() == 0:
        print(json.dumps({"config": config_name, "strategy": strategy, "ranks": dist.get_world_size(),
                          "parameters": parameter_count(config.model), **held}))
    distributed.shutdown()


def measure(config_name: str, strategy: str, ranks: int) -> dict:
    command = [*TORCHRUN, f"--nproc-per-node={ranks}", __file__, "--worker", config_name, strategy]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"bench_fsdp_memory: {config_name} {strategy} on {ranks} ranks failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = BenchParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=listed(known_config), default=["seed", "large"])
    parser.add_argument("--strategies", type=listed(one_of("ddp", "fsdp")), default=["ddp", "fsdp"])
    parser.add_argument("--ranks", type=listed(at_least(1)), default=[1, 2, 4, 8])
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    print("| config | parameters | strategy | ranks | weights MiB | gradients MiB | AdamW MiB | total MiB | "
          "of DDP's |")
    print("|---|---|---|---|---|---|---|---|---|")
    for config_name in args.configs:
        ddp_total = None
        for strategy in args.strategies:
            for ranks in args.ranks:
                row = measure(config_name, strategy, ranks)
                total = row["param_bytes"] + row["grad_bytes"] + row["optimizer_bytes"]
                if strategy == "ddp" and ranks == 1:
                    ddp_total = total
                share = f"{total / ddp_total:.3f} (1/N = {1 / ranks:.3f})" if ddp_total else "-"
                mib = lambda key: f"{row[key] / 2**20:,.1f}"  # noqa: E731
                print(f"| {config_name} | {row['parameters'] / 1e6:.1f}M | {strategy} | {ranks} | {mib('param_bytes')} | "
                      f"{mib('grad_bytes')} | {mib('optimizer_bytes')} | {total / 2**20:,.1f} | {share} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
