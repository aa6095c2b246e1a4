"""Using a trained model: load a checkpoint, generate text, measure validation loss and decode speed.

    gptcore sample --ckpt runs/cpu/ckpt.pt --prompt "ROMEO:" --tokens 300
    gptcore eval --ckpt runs/cpu/ckpt.pt --json
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from gptcore.checkpointing import checkpoint
from gptcore.checkpointing.sharded import checkpoint_directory, is_sharded, open_checkpoint
from gptcore.config import config_from_dict
from gptcore.data.batches import Batches
from gptcore.data.corpus import CORPORA, ByteTokenizer, CharTokenizer, tokenizer_for
from gptcore.data.prepare import resolve_data
from gptcore.errors import UserInputError
from gptcore.inference.quantize import CPU_ONLY_MODES, dequantized_model, model_from_quantized
from gptcore.inference.weight_layout import column_major_linears
from gptcore.models.gpt import GPT
from gptcore.telemetry import hardware

DECODE_WARMUP_TOKENS = 16  # first kernels, allocator, torch.compile and CUDA-graph capture
PROBE_TOKENS, PROBE_ROUNDS = 8, 3  # fastest_form: short bursts per form, alternating


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: CharTokenizer | ByteTokenizer
    config: object
    kind: str  # "fp32" or a quantization mode
    device: torch.device
    path: Path | None = None  # the checkpoint file it came from
    weights: str = ""  # int8/int4 under `sample`: "quantized" (its kernels) or "fp32" (dequantized once)
    runs_as: str = ""  # the same in words, and why


def resolve_device(choice: str, kind: str) -> torch.device:
    """`auto`: the GPU when there is one, except for int8/int4 files, whose kernels are CPU
    kernels; an explicit device must exist and suit the file."""
    if choice == "auto":
        usable = torch.cuda.is_available() and kind not in CPU_ONLY_MODES
        return torch.device("cuda" if usable else "cpu")
    try:
        device = torch.device(choice)
    except (RuntimeError, ValueError):
        raise UserInputError(f"--device {choice!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise UserInputError(f"--device {choice!r}: gptcore runs on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {choice}: no CUDA device is usable here; use --device auto or cpu")
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserInputError(f"--device {choice}: only {torch.cuda.device_count()} GPU(s) are visible")
        if kind in CPU_ONLY_MODES:
            raise UserInputError(f"{kind} checkpoints run on the CPU (--device cpu); for a GPU, "
                                 "export one with `gptcore quantize --mode bf16`")
    return device


def load_model(ckpt_path: Path, device: str = "auto", state: dict | None = None) -> LoadedModel:
    """A checkpoint file, or a sharded checkpoint (its directory or its run's), ready to generate;
    `state`: what open_checkpoint already read from it, so that it is not read (or, sharded,
    consolidated) a second time."""
    sharded = is_sharded(ckpt_path)
    state = state if state is not None else open_checkpoint(ckpt_path)
    try:
        config = config_from_dict(state["config"], f"the config in {ckpt_path}")
        kind = "fp32" if state["format"] == checkpoint.FORMAT else str(state.get("mode"))
        if not sharded:  # consolidate checked the shards' size
            checkpoint.check_header_fits_file(config, kind, Path(ckpt_path).stat().st_size, Path(ckpt_path))
        if state["format"] == checkpoint.FORMAT:
            model = GPT(config.model, init_weights=False)
            model.load_state_dict(state["model"])
            kind = "fp32"
            if bad := checkpoint.first_non_finite(state["model"]):
                raise UserInputError(f"checkpoint {ckpt_path} holds NaN or infinite weights ({bad}): its run diverged "
                                     "or the file was altered; use an earlier checkpoint or retrain")
        else:
            model, kind = model_from_quantized(state, config)
        tokenizer = tokenizer_for(state["vocab"], config.model.vocab_size)
    except UserInputError:
        raise
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise UserInputError(f"checkpoint {ckpt_path} is damaged or from another version ({checkpoint.one_line(err)}); "
                             "retrain or re-export it") from None
    target = resolve_device(device, kind)
    path = checkpoint_directory(ckpt_path) if sharded else Path(ckpt_path)  # its run's data is beside it
    return LoadedModel(column_major_linears(model.to(target).eval()), tokenizer, config, kind, target, path)


def in_fp32(loaded: LoadedModel, state: dict) -> LoadedModel:
    """An int8/int4 model computing with its weights dequantized to fp32 once, at load."""
    model = column_major_linears(dequantized_model(state, loaded.config))
    return replace(loaded, model=model, weights="fp32", runs_as="weights in fp32")


def fastest_form(loaded: LoadedModel, state: dict) -> LoadedModel:
    """An int8/int4 model on the CPU, decoding by its quantized kernels or by the same weights in
    fp32, whichever generates faster here: short bursts of each, alternating, the best of each.
    Small models (weights in cache) are bound by per-call overhead, where fp32 wins; large ones
    by reading the weights, where int8/int4 win. The file and its numbers stay what they are."""
    if loaded.kind not in CPU_ONLY_MODES:
        return loaded
    forms = {"kernels": loaded, "fp32": in_fp32(loaded, state)}
    idx = torch.tensor([loaded.tokenizer.encode("\n")], dtype=torch.long)
    best = dict.fromkeys(forms, 0.0)
    for _ in range(PROBE_ROUNDS):  # the first round warms each form up; the best round counts
        for form, candidate in forms.items():
            start = time.perf_counter()
            candidate.model.generate(idx, PROBE_TOKENS, use_cache=True)
            best[form] = max(best[form], PROBE_TOKENS / (time.perf_counter() - start))
    if best["fp32"] > best["kernels"]:
        return replace(forms["fp32"], runs_as=f"weights in fp32, {best['fp32'] / best['kernels']:.1f}x its "
                                              f"{loaded.kind} kernels here")
    return replace(loaded, weights="quantized",
                   runs_as=f"{loaded.kind} kernels, {best['kernels'] / best['fp32']:.1f}x fp32 here")


def timed_generate(loaded: LoadedModel, idx: torch.Tensor, tokens: int, seed: int, temperature: float,
                   top_k: int | None, use_cache: bool, compile: bool) -> tuple[torch.Tensor, float]:
    """(idx with `tokens` new tokens, tokens/s). The speed is timed after a short warm-up with its
    own generator, and up to the device having finished, so a GPU's queued work is counted."""
    device = loaded.device
    def run(count: int, generator_seed: int) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(generator_seed)
        return loaded.model.generate(idx, count, temperature=temperature, top_k=top_k, generator=generator,
                                     use_cache=use_cache, compile=compile)
    run(min(tokens, DECODE_WARMUP_TOKENS), seed + 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = run(tokens, seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return out, tokens / elapsed if elapsed > 0 else float("inf")


def generate_text(loaded: LoadedModel, prompt: str, tokens: int, temperature: float = 0.8,
                  top_k: int | None = 200, seed: int = 1337, use_cache: bool = True,
                  compile: bool = False) -> tuple[str, float]:
    """The prompt plus `tokens` new characters, and the generation speed in tokens/s."""
    ids = loaded.tokenizer.encode(prompt or "\n")
    idx = torch.tensor([ids], dtype=torch.long, device=loaded.device)
    out, speed = timed_generate(loaded, idx, tokens, seed, temperature, top_k, use_cache, compile)
    return loaded.tokenizer.decode(out[0].tolist()), speed


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once (the tied head
    and embedding are one tensor), except the position table, of which it reads one row. The KV
    cache is left out, as gpt-fast does: at these lengths it is small next to the weights."""
    seen, total = set(), 0
    table = model.transformer["wpe"] if "wpe" in model.transformer else torch.nn.Module()
    skipped = {id(t) for t in table.parameters()} | {id(t) for t in table.buffers()}
    for tensor in (*model.parameters(), *model.buffers()):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen and id(tensor) not in skipped:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def decode_speed(loaded: LoadedModel, tokens: int, seed: int, compile: bool = False) -> dict:
    """Batch-1 decode with the KV cache: tokens/s and the memory bandwidth it implies (weight
    bytes read per token x tokens/s) against the device's, as gpt-fast reports it."""
    idx = torch.tensor([loaded.tokenizer.encode("\n")], dtype=torch.long, device=loaded.device)
    _, speed = timed_generate(loaded, idx, tokens, seed, 0.8, 200, True, compile)
    read = weight_bytes(loaded.model)
    peak, source = hardware.memory_gbps(loaded.device)
    achieved = read * speed / 1e9
    return {"tokens_per_s": speed, "weight_bytes": read, "achieved_gbps": achieved,
            "bandwidth_gbps": peak, "bandwidth_source": source, "bandwidth_utilization": achieved / peak,
            "device": str(loaded.device), "compiled": compile, "new_tokens": tokens}


def eval_data(loaded: LoadedModel, data_path: str | None, scratch: Path) -> Path:
    """The prepared data an evaluation reads. --data when given (a text file is prepared into
    `scratch`, a temporary directory: nothing is written beside the checkpoint); otherwise the
    data that training prepared beside the checkpoint (RUN_DIR/data), or the named corpus it was
    trained on. A path recorded inside a checkpoint is never opened: the file is not trusted to
    name what may be read or written."""
    vocab, owner = loaded.tokenizer.vocab, f"the checkpoint {loaded.path}"
    if data_path:  # a text is encoded with the checkpoint's vocabulary
        return resolve_data(data_path, loaded.config.data.clean, scratch, vocab, owner)
    beside = loaded.path.parent / "data" if loaded.path else None
    if beside is not None and (beside / "meta.json").is_file():
        return beside
    if loaded.config.data.path in CORPORA:
        return resolve_data(loaded.config.data.path, loaded.config.data.clean, scratch, vocab, owner)
    raise UserInputError(f"no prepared data beside {loaded.path}; pass the text to evaluate on with --data "
                         "(a text file, a prepared directory or a corpus name)")


@torch.no_grad()
def evaluate(loaded: LoadedModel, data_path: str | None, batches: int = 20, batch_size: int = 16) -> dict:
    """Validation loss on fixed batches (the same seed every time, so checkpoints and their
    quantized versions are compared on identical text)."""
    config = loaded.config
    with tempfile.TemporaryDirectory(prefix="gptcore-eval-") as scratch:
        data_dir = eval_data(loaded, data_path, Path(scratch))
        data = Batches(data_dir, config.model.block_size, seed=config.train.seed, device=loaded.device)
        if data.meta["vocab"] != loaded.tokenizer.vocab:
            raise UserInputError(f"the data at {data_dir} has another vocabulary than the checkpoint; "
                                 "evaluate on the text the model was trained on")
        total = torch.zeros((), device=loaded.device)
        for x, y in data.eval_batches("val", batches, batch_size):
            _, loss = loaded.model(x, y)
            total += loss.float()
        val_loss = total.item() / batches
    return {"val_loss": val_loss, "val_bpc": val_loss / math.log(2), "batches": batches,
            "batch_size": batch_size, "block_size": config.model.block_size, "model": loaded.kind,
            "device": str(loaded.device)}
