"""What the CPU benchmarks train on: the two nanoGPT-comparable shapes, and the text."""

from __future__ import annotations

from harness import REPO
TINY_SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"

SHAPES = {  # model sizes and rows per step
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12},
    "medium": {"n_layer": 8, "n_head": 8, "n_embd": 256, "block_size": 128, "batch_size": 16},
}


def model_overrides(name: str) -> list[str]:
    return [f"model.{key}={value}" for key, value in SHAPES[name].items() if key != "batch_size"]


def overrides(name: str) -> list[str]:
    """The shape as `gptcore train` overrides, batch included."""
    return [*model_overrides(name), f"train.batch_size={SHAPES[name]['batch_size']}"]


def data_path() -> str:
    """Tiny Shakespeare where ../shared has it, else the default corpus."""
    return str(TINY_SHAKESPEARE) if TINY_SHAKESPEARE.is_file() else "shakespeare"
