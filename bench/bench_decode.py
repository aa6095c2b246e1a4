"""Batch-1 decode on the CPU: the eager one-token step against the torch.compile'd one.

    python bench/bench_decode.py                       # seed and cpu shapes, 1 and 2 threads
    python bench/bench_decode.py --shape seed --rounds 5 --tokens 300

Random weights at each shape (decode speed does not depend on what was learned), fp32, KV cache,
temperature 0.8, top-k 200, through gptcore.inference.generate.decode_speed (a 16-token warm-up, then the
timed run). Compiling happens once per model before the rounds. Each round times every variant
in turn, eager and compiled alternating, rotating which goes first, so drifting load from other
processes falls on all alike; a variant's figure is the median over rounds (min-max beside it),
ratios are of those medians. Before each round the 1-minute load average must fall below
--max-load; the CPU other processes took during each round is printed with it.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from harness import OthersCpu, spread, wait_for_quiet

from gptcore.config import load_config  # noqa: E402
from gptcore.data.corpus import CharTokenizer  # noqa: E402
from gptcore.inference.generate import LoadedModel, decode_speed  # noqa: E402
from gptcore.models.gpt import GPT  # noqa: E402

SHAPES = {"seed": "seed", "cpu": "cpu"}  # preset whose model shape is timed
VOCAB = ["\n", *(chr(32 + i) for i in range(64))]


def model_for(preset: str) -> LoadedModel:
    config = load_config(preset, [])
    config.model.vocab_size, config.model.dropout = len(VOCAB), 0.0
    torch.manual_seed(0)
    return LoadedModel(GPT(config.model).eval(), CharTokenizer(VOCAB), config, "fp32", torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-load", type=float, default=1.0)
    args = parser.parse_args()
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    for shape in shapes:
        loaded = model_for(SHAPES[shape])
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            decode_speed(loaded, 8, seed=0, compile=True)  # compile (and warm) outside the timed rounds
            speeds, rounds = {"eager": [], "compiled": []}, []
            for index in range(args.rounds):
                load = wait_for_quiet(args.max_load, timeout_s=120)
                order = ["eager", "compiled"][::-1 if index % 2 else 1]
                with OthersCpu() as others:
                    for variant in order:
                        speeds[variant].append(decode_speed(loaded, args.tokens, seed=index,
                                                            compile=variant == "compiled")["tokens_per_s"])
                rounds.append({"load_1m": round(load, 2), "others_cpu_pct": round(others.pct, 1)})
            eager, compiled = statistics.median(speeds["eager"]), statistics.median(speeds["compiled"])
            print(json.dumps({"shape": shape, "threads": threads, "tokens": args.tokens,
                              "eager_tokens_per_s": spread(speeds["eager"]),
                              "compiled_tokens_per_s": spread(speeds["compiled"]),
                              "compiled_vs_eager": round(compiled / eager, 3), "rounds": rounds}), flush=True)


if __name__ == "__main__":
    main()
