"""What a checkpoint costs the training loop at the `seed` shape (25M parameters + AdamW state).

    python bench/bench_checkpoint.py                 # 5 rounds, into a temporary directory
    python bench/bench_checkpoint.py --dir /scratch/me --rounds 7

Variants, timed in turn in every round (rotating which goes first):
  blocking     what the trainer did before: serialize to memory, then write the file (temp file,
               fsync, rename) while every rank waits: the stall is the whole save
  background   gptcore.checkpointing.checkpoint.Checkpointer: the stall is the copy to host memory; the write
               goes on in a thread (its duration is reported too, and the next save waits for it)
  verify       checking the CRC-32 of every record on load (torch.save writes them, torch.load does
               not check them), against torch.load itself; and what computing those CRCs costs a
               save: serializing into memory with and without them (set_crc32_options), which
               leaves out the disk and its noise, against the whole blocking save
Then a few training steps of the same model with a background write in flight, against the same
steps without, which is what the thread takes from training on a 2-core machine.
Figures are medians over rounds (min-max); the 1-minute load average before each round and the
CPU other processes took during it are printed.
"""

from __future__ import annotations

import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from harness import OthersCpu, spread, wait_for_quiet
from arguments import BenchParser, at_least, non_negative_number, output_path

from gptcore.checkpointing import checkpoint  # noqa: E402
from gptcore.config import load_config  # noqa: E402
from gptcore.files import atomic_write_bytes  # noqa: E402
from gptcore.models.gpt import GPT  # noqa: E402
from gptcore.models.optim import make_optimizer  # noqa: E402


class Data:  # the data position a checkpoint holds
    def __init__(self):
        self.generator = torch.Generator().manual_seed(0)

    def state_dict(self):
        return {"generator": self.generator.get_state()}


def seed_model(batch: int):
    config = load_config("seed", ["model.dropout=0.0"])
    config.model.vocab_size = 65
    torch.manual_seed(0)
    model = GPT(config.model)
    optimizer = make_optimizer(model, config)
    x = torch.randint(0, 65, (batch, config.model.block_size))

    def step():
        _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's state exists from the first step on
    return config, model, optimizer, step


def blocking_save(state: dict, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def main() -> None:
    parser = BenchParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=at_least(1), default=5)
    parser.add_argument("--dir", default=None, help="where the files go (default: a temporary directory)")
    parser.add_argument("--batch", type=at_least(1), default=2, help="rows per training step in the last test")
    parser.add_argument("--steps", type=at_least(1), default=4)
    parser.add_argument("--max-load", type=non_negative_number, default=1.0)
    args = parser.parse_args()
    scratch = output_path(args.dir, "--dir", directory=True)
    if scratch:
        scratch.mkdir(parents=True, exist_ok=True)
    config, model, optimizer, step = seed_model(args.batch)
    data = Data()
    run = {"config": config.to_dict(), "vocab": [chr(i) for i in range(65)], "world_size": 1, "best_val_loss": 1.0}
    times = {name: [] for name in ("blocking", "background stall", "background write", "serialize", "serialize, no CRC-32",
                                   "verify on load", "torch.load", "steps alone", "steps beside a write")}
    notes = []
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        path = Path(tmp) / "ckpt.pt"
        writer = checkpoint.Checkpointer(path, torch.device("cpu"), rank=0)
        state = {"format": checkpoint.FORMAT, "step": 1, "model": model.state_dict(),
                 "optimizer": optimizer.state_dict(), "data": data.state_dict(), **run}
        size = None
        for index in range(args.rounds):
            load = wait_for_quiet(args.max_load, timeout_s=120)
            with OthersCpu() as others:
                variants = ["blocking", "serialize", "serialize, no CRC-32", "background"]
                for variant in variants[index % 4:] + variants[:index % 4]:
                    start = time.perf_counter()
                    if variant == "blocking":
                        blocking_save(state, path)
                        times[variant].append(1000 * (time.perf_counter() - start))
                    elif variant.startswith("serialize"):
                        torch.serialization.set_crc32_options(variant == "serialize")
                        torch.save(state, io.BytesIO())
                        torch.serialization.set_crc32_options(True)
                        times[variant].append(1000 * (time.perf_counter() - start))
                    else:
                        writer.save(1, model, optimizer, data, **run)
                        times["background stall"].append(1000 * (time.perf_counter() - start))
                        writer.wait()
                        times["background write"].append(1000 * (time.perf_counter() - start))
                writer.save(1, model, optimizer, data, **run)  # a file with its CRCs, to verify
                writer.wait()
                size = path.stat().st_size
                start = time.perf_counter()
                assert checkpoint.damaged_record(path) is None
                times["verify on load"].append(1000 * (time.perf_counter() - start))
                start = time.perf_counter()
                torch.load(path, map_location="cpu", weights_only=True)
                times["torch.load"].append(1000 * (time.perf_counter() - start))
                for beside in ((False, True) if index % 2 == 0 else (True, False)):
                    if beside:
                        writer.save(1, model, optimizer, data, **run)
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    times["steps beside a write" if beside else "steps alone"].append(
                        1000 * (time.perf_counter() - start) / args.steps)
                    writer.wait()
            notes.append({"load_1m": round(load, 2), "others_cpu_pct": round(others.pct, 1)})
    result = {name: spread(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    result.update({
        "file_mb": round(size / 1e6, 1), "threads": torch.get_num_threads(),
        "stall_reduction": round(median["blocking"] / median["background stall"], 1),
        "verify_share_of_a_load": round(median["verify on load"] / median["torch.load"], 3),
        "crc_ms": round(median["serialize"] - median["serialize, no CRC-32"], 1),
        "crc_share_of_a_save": round((median["serialize"] - median["serialize, no CRC-32"]) / median["blocking"], 3),
        "step_slowdown_beside_a_write": round(median["steps beside a write"] / median["steps alone"], 3),
        "rounds": notes})
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
