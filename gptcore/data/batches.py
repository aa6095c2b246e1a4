"""Per-rank batches from prepared token files: random windows of the token stream, as tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptcore.data.corpus import read_meta
from gptcore.errors import UserInputError


@dataclass
class Shard:
    """This rank's slice of every global batch."""

    rank: int = 0
    world_size: int = 1


class Batches:
    """Random windows of the token stream, drawn from one seeded generator, as tensors on `device`.

    Every rank draws the same global batch of offsets and keeps its own slice, so N ranks x B
    rows take exactly the rows 1 rank x N*B would. The generator's state is the data position
    saved in checkpoints, which makes resume exact. On a GPU the token array itself moves to the
    device when it fits (GPU_TOKENS_MAX_BYTES), and rows are gathered there; larger corpora are
    read from the memmap and copied over through pinned memory."""

    GPU_TOKENS_MAX_BYTES = 2 * 2**30

    def __init__(self, data_dir: Path, block_size: int, seed: int, shard: Shard = Shard(),
                 device: torch.device = torch.device("cpu")):
        meta = read_meta(data_dir)
        self.meta = meta
        self.block_size = block_size
        self.shard = shard
        self.seed = seed
        self.device = torch.device(device)
        dtype = np.dtype(meta["dtype"])
        self.splits = {
            split: np.memmap(Path(data_dir) / f"{split}.bin", dtype=dtype, mode="r")
            for split in ("train", "val")
        }
        for split, tokens in self.splits.items():
            if len(tokens) < block_size + 1:
                raise UserInputError(
                    f"the {split} split has {len(tokens)} tokens, fewer than block_size+1 = {block_size + 1}; "
                    f"use a longer text or a smaller model.block_size")
        self.generator = torch.Generator().manual_seed(seed)
        self.window = torch.arange(block_size + 1)
        self.on_device = {}  # split -> int32 token tensor on the GPU
        if self.device.type == "cuda":
            for split, tokens in self.splits.items():
                if 4 * len(tokens) <= self.GPU_TOKENS_MAX_BYTES:
                    self.on_device[split] = torch.from_numpy(tokens.astype(np.int32)).to(self.device)
            self.window = self.window.to(self.device)

    def _rows(self, split: str, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_rank = len(offsets) // self.shard.world_size
        return self._windows(split, offsets[self.shard.rank * per_rank:(self.shard.rank + 1) * per_rank])

    def _windows(self, split: str, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the windows starting at the offsets `mine`."""
        if split in self.on_device:
            index = mine.pin_memory().to(self.device, non_blocking=True)[:, None] + self.window
            rows = self.on_device[split][index].long()
        else:
            rows = torch.from_numpy(self.splits[split][(mine[:, None] + self.window.cpu()).numpy()].astype(np.int64))
            if self.device.type == "cuda":
                rows = rows.pin_memory().to(self.device, non_blocking=True)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def _offsets(self, split: str, count: int, generator: torch.Generator) -> torch.Tensor:
        high = len(self.splits[split]) - self.block_size
        return torch.randint(high, (count,), generator=generator)

    def next_train(self, global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows("train", self._offsets("train", global_batch, self.generator))

    def eval_batches(self, split: str, count: int, global_batch: int):
        """The same `count` batches at every evaluation, so losses are comparable over time."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        for _ in range(count):
            yield self._rows(split, self._offsets(split, global_batch, generator))

    def full_pass(self, split: str, rows: int):
        """Every token of a split once, as consecutive non-overlapping windows, `rows` at a time
        (the last batch may be shorter): a deterministic measure that samples nothing. Each rank
        takes its share of the windows (a contiguous slice); rows are per rank here."""
        tokens = len(self.splits[split])
        offsets = torch.arange(0, tokens - self.block_size, self.block_size)
        mine = offsets.tensor_split(self.shard.world_size)[self.shard.rank]
        for start in range(0, len(mine), rows):
            yield self._windows(split, mine[start:start + rows])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
