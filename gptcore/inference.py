"""Using a trained model: load a checkpoint, generate text, measure validation loss.

    gptcore sample --ckpt runs/cpu/ckpt.pt --prompt "ROMEO:" --tokens 300
    gptcore eval --ckpt runs/cpu/ckpt.pt --json
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gptcore import checkpoint
from gptcore.config import config_from_dict
from gptcore.data import Batches, CharTokenizer, resolve_data
from gptcore.errors import UserInputError
from gptcore.model import GPT


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: CharTokenizer
    config: object
    kind: str  # "fp32" or a quantization mode


def load_model(ckpt_path: Path, device: str = "cpu") -> LoadedModel:
    state = checkpoint.load(ckpt_path)
    try:
        config = config_from_dict(state["config"])
        if state["format"] == checkpoint.FORMAT:
            model = GPT(config.model)
            model.load_state_dict(state["model"])
            kind = "fp32"
        else:
            from gptcore.quantize import model_from_quantized

            model, kind = model_from_quantized(state, config)
        tokenizer = CharTokenizer(state["vocab"])
    except UserInputError:
        raise
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise UserInputError(f"checkpoint {ckpt_path} is damaged or from another version ({err}); retrain or re-export it") from None
    return LoadedModel(model.to(device).eval(), tokenizer, config, kind)


def generate_text(loaded: LoadedModel, prompt: str, tokens: int, temperature: float = 0.8,
                  top_k: int | None = 200, seed: int = 1337, use_cache: bool = True) -> tuple[str, float]:
    """The prompt plus `tokens` new characters, and the generation speed in tokens/s."""
    device = next(loaded.model.parameters()).device
    ids = loaded.tokenizer.encode(prompt or "\n")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    start = time.perf_counter()
    out = loaded.model.generate(idx, tokens, temperature=temperature, top_k=top_k,
                                generator=generator, use_cache=use_cache)
    elapsed = time.perf_counter() - start
    return loaded.tokenizer.decode(out[0].tolist()), tokens / elapsed if elapsed > 0 else float("inf")


@torch.no_grad()
def evaluate(loaded: LoadedModel, data_path: str | None, batches: int = 20, batch_size: int = 16,
             scratch_dir: Path | None = None) -> dict:
    """Validation loss on fixed batches (the same seed every time, so checkpoints and their
    quantized versions are compared on identical text)."""
    config = loaded.config
    data_dir = resolve_data(data_path or config.data.path, config.data.clean,
                            scratch_dir or Path(config.out_dir) / "data")
    data = Batches(data_dir, config.model.block_size, seed=config.train.seed)
    if data.meta["vocab"] != loaded.tokenizer.vocab:
        raise UserInputError(f"the data at {data_dir} has another vocabulary than the checkpoint; "
                             "evaluate on the text the model was trained on")
    device = next(loaded.model.parameters()).device
    total = 0.0
    for x, y in data.eval_batches("val", batches, batch_size):
        _, loss = loaded.model(x.to(device), y.to(device))
        total += loss.item()
    val_loss = total / batches
    return {"val_loss": val_loss, "val_bpc": val_loss / math.log(2), "batches": batches,
            "batch_size": batch_size, "block_size": config.model.block_size, "model": loaded.kind}
