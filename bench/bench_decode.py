"""Batch-1 decode on the CPU: the eager one-token step against the torch.compile'd one, or the
weights' two layouts (gptcore.inference.weight_layout) against each other.

    python bench/bench_decode.py                       # seed and cpu shapes, 1 and 2 threads
    python bench/bench_decode.py --shape seed --rounds 5 --tokens 300
    python bench/bench_decode.py --compare layout --shape all   # row-major nn.Linear vs column-major

Random weights at each shape (decode speed does not depend on what was learned), fp32, KV cache,
temperature 0.8, top-k 200, through gptcore.inference.generate.decode_speed (a 16-token warm-up,
then the timed run). Compiling happens once per model before the rounds. Each round times both
variants in turn, alternating which goes first, so drifting load from other processes falls on both
alike; a variant's figure is the median over rounds (min-max beside it), ratios are of those
medians. Before each round the 1-minute load average must fall below --max-load; the CPU other
processes took during each round is printed with it.
"""

from __future__ import annotations

import json
import statistics

import torch

from harness import OthersCpu, spread, wait_for_quiet
from arguments import BenchParser, at_least, listed, non_negative_number, thread_count

from gptcore.config import load_config  # noqa: E402
from gptcore.data.corpus import CharTokenizer  # noqa: E402
from gptcore.inference.generate import LoadedModel, decode_speed  # noqa: E402
from gptcore.inference.weight_layout import column_major_linears  # noqa: E402
from gptcore.models.gpt import GPT  # noqa: E402

SHAPES = ("seed", "shakespeare_char", "cpu", "tiny")  # presets whose model shape can be timed
VOCAB = ["\n", *(chr(32 + i) for i in range(64))]


def model_for(preset: str, layout: str = "column-major") -> LoadedModel:
    """A model of the preset's shape with random weights, in the layout that `gptcore sample`
    loads on the CPU (column-major) or in nn.Linear's own (row-major)."""
    config = load_config(preset, [])
    config.model.vocab_size, config.model.dropout = len(VOCAB), 0.0
    torch.manual_seed(0)
    model = GPT(config.model).eval()
    if layout == "column-major":
        column_major_linears(model)
    return LoadedModel(model, CharTokenizer(VOCAB), config, "fp32", torch.device("cpu"))


def variants_for(shape: str, compare: str) -> dict[str, tuple[LoadedModel, bool]]:
    """{variant: (model, compiled)} for one comparison; the first variant is the base."""
    if compare == "compile":
        loaded = model_for(shape)
        return {"eager": (loaded, False), "compiled": (loaded, True)}
    return {"row-major": (model_for(shape, "row-major"), False), "column-major": (model_for(shape), False)}


def main() -> None:
    parser = BenchParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=["compile", "layout"], default="compile")
    parser.add_argument("--shape", default="seed,cpu", help=f"comma-separated of {', '.join(SHAPES)}, or all")
    parser.add_argument("--threads", type=listed(thread_count(1)), default=[1, 2])
    parser.add_argument("--tokens", type=at_least(1), default=200)
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--max-load", type=non_negative_number, default=1.0)
    args = parser.parse_args()
    shapes = list(SHAPES) if args.shape == "all" else args.shape.split(",")
    if unknown := [shape for shape in shapes if shape not in SHAPES]:
        parser.error(f"unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)} or all")
    for shape in shapes:
        variants = variants_for(shape, args.compare)
        base, other = list(variants)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for loaded, compiled in variants.values():  # compile and warm up outside the timed rounds
                decode_speed(loaded, 8, seed=0, compile=compiled)
            speeds, rounds = {name: [] for name in variants}, []
            for index in range(args.rounds):
                load = wait_for_quiet(args.max_load, timeout_s=120)
                with OthersCpu() as others:
                    for name in [base, other][::-1 if index % 2 else 1]:
                        loaded, compiled = variants[name]
                        speeds[name].append(decode_speed(loaded, args.tokens, seed=index,
                                                         compile=compiled)["tokens_per_s"])
                rounds.append({"load_1m": round(load, 2), "others_cpu_pct": round(others.pct, 1)})
            ratio = statistics.median(speeds[other]) / statistics.median(speeds[base])
            print(json.dumps({"shape": shape, "threads": threads, "tokens": args.tokens,
                              **{f"{name}_tokens_per_s": spread(speeds[name]) for name in variants},
                              f"{other}_vs_{base}": round(ratio, 3), "rounds": rounds}), flush=True)


if __name__ == "__main__":
    main()
