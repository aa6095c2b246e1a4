"""What a training run is built from before its first step: the rank's threads and device, its
numerics, the data and the vocabulary they are encoded with, the model (fresh, or train.init_from's
weights) and what its memory will need."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import psutil
import torch

from gptcore.checkpointing import checkpoint
from gptcore.checkpointing.checkpoint import check_header_fits_file
from gptcore.cluster import allocator, distributed
from gptcore.cluster.parallel import estimated_memory
from gptcore.config import ARCHITECTURE_KEYS, Config, config_from_dict, resume_conflicts
from gptcore.data.batches import Batches, Shard
from gptcore.data.corpus import tokenizer_for, vocabulary_name
from gptcore.data.prepare import resolve_data
from gptcore.errors import UserInputError, shown
from gptcore.models.gpt import GPT, parameter_count
from gptcore.telemetry import hardware

# What a run writes into its directory besides its checkpoints; a fresh run moves an earlier one's aside.
EARLIER_RUN_FILES = ("metrics.jsonl", "config.yaml", "samples", "profile", "hang", "tb", "wandb", "wandb_run_id")


def autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device does bf16 in hardware (`auto`), never emulated; there is no
    fp16 path, so no loss scaling is needed. None: plain fp32."""
    choice = config.train.dtype
    if choice == "auto":
        return torch.bfloat16 if hardware.has_native_bf16(device) else None
    return torch.bfloat16 if choice == "bfloat16" else None


def autocast_context(dtype: torch.dtype | None, device: torch.device):
    """What the forward passes on DEVICE run under: autocast to DTYPE (autocast_dtype's), or nothing."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def compiles(config: Config, device: torch.device) -> bool:
    """torch.compile on CUDA by default (nanoGPT: ~1.8x per iteration); on the CPU it did not pay
    at our shapes (BENCHMARKS.md), so there only when asked."""
    choice = config.train.compile
    return device.type == "cuda" if choice == "auto" else choice == "true"


def compile_scope(config: Config, device: torch.device) -> str:
    """What torch.compile covers, for the start line: the whole model, each block (fsdp), or nothing."""
    if not compiles(config, device):
        return "off"
    return "per block (fsdp: the root runs eager)" if config.train.parallel == "fsdp" else "on"


def describe_settings(config: Config, contract: distributed.RankContract, device: torch.device, dtype_name: str) -> str:
    """The run's first log line: how it was launched and what it computes with."""
    t = config.train
    return (f"world_size={contract.world_size} launcher={contract.launcher} device={device} parallel={t.parallel} "
            f"optimizer={t.optimizer} schedule={t.schedule} dtype={dtype_name} backend={distributed.backend_name()} "
            f"compile={compile_scope(config, device)} deterministic={'on' if t.deterministic else 'off'}")


def describe_model(config: Config, model: GPT, global_batch: int, device: torch.device, peak_tflops: float | None) -> str:
    peak = f", peak {peak_tflops:g} TFLOP/s per device" if peak_tflops else ""
    return (f"model: {model.num_params() / 1e6:.2f}M parameters, global batch {global_batch * config.train.grad_accum} "
            f"x {config.model.block_size} tokens, {hardware.device_name(device)}{peak}")


def set_numerics(deterministic: bool, device: torch.device) -> None:
    """train.deterministic: kernels that give the same bits on every run (PyTorch's deterministic
    algorithms, cuBLAS's fixed workspace, no cuDNN or memory-efficient attention, whose backward
    passes accumulate in a varying order) and plain fp32 matmuls. Otherwise TF32 for fp32 matmuls
    on GPUs that have it."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True)
        torch.set_float32_matmul_precision("highest")
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cuda.enable_cudnn_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
    else:
        torch.set_float32_matmul_precision("high")


def check_memory(config: Config, rows_per_rank: int, device: torch.device, world_size: int = 1) -> None:
    """Refuse, before allocating, a model and batch that cannot fit the device's memory
    (parallel.estimated_memory: the training state and one micro-batch's activations)."""
    m, t = config.model, config.train
    state, activations = estimated_memory(m, rows_per_rank, t.parallel, world_size, t.activation_checkpointing)
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else psutil.virtual_memory().total)
    if state + activations > total:
        raise UserInputError(
            f"this model and batch need about {(state + activations) / 1e9:,.1f} GB per rank ({state / 1e9:,.1f} GB "
            f"for {parameter_count(m):,} parameters with their gradients and AdamW state under {t.parallel}, "
            f"{activations / 1e9:,.1f} GB for one micro-batch of {rows_per_rank} x {m.block_size} tokens), more than "
            f"the {total / 1e9:,.1f} GB of {hardware.device_name(device)}; lower train.batch_size (raise "
            "train.grad_accum to keep the batch), model.block_size or the model's size, or shard the state over "
            "the ranks: train.parallel=fsdp")


def start_rank(config: Config, contract: distributed.RankContract) -> tuple[distributed.Threads, torch.device]:
    """This rank's heap (cluster.allocator), threads, device and numerics, and its place in the
    process group."""
    t = config.train
    allocator.keep_buffers_in_heap()
    threads = distributed.thread_share(t.threads, t.cpu_ranks, contract)
    torch.set_num_threads(threads.count)
    device = distributed.choose_device(contract, t.device)
    if compiles(config, device):
        hardware.check_cpu_compile(device, "train.compile=true", "set train.compile=false")
    set_numerics(t.deterministic, device)
    distributed.preflight(contract, cuda_devices=torch.cuda.device_count() if device.type == "cuda" else 0)
    distributed.init_process_group(contract, device, t.timeout_s, str(Path(config.out_dir)),
                                   t.single_rank_group or t.parallel == "fsdp")  # FSDP shards over a group
    if contract.world_size > 1:  # every rank, so a multi-node log shows where each one ran
        print(f"rank {contract.rank}/{contract.world_size} on {socket.gethostname()}: "
              f"{torch.get_num_threads()} thread(s), {threads.reason()}", flush=True)
    return threads, device


def load_batches(config: Config, contract: distributed.RankContract, device: torch.device, out_dir: Path,
                 resume_state: dict | None, start: dict | None) -> Batches:
    """The run's prepared data (rank 0 prepares, the others wait), encoded with the vocabulary the
    run must keep; config.model.vocab_size is set from it."""
    vocab, owner = data_vocabulary(config, resume_state, start)
    data_dir = distributed.rank0_first(
        lambda: resolve_data(config.data.path, config.data.clean, out_dir / "data", vocab, owner))
    batches = Batches(data_dir, config.model.block_size, config.train.seed, Shard(contract.rank, contract.world_size),
                      device)
    config.model.vocab_size = batches.meta["vocab_size"]
    return batches


def build_model(config: Config, device: torch.device, start: dict | None, rank: int) -> GPT:
    """The same initial weights on every rank (or train.init_from's), then a per-rank seed, so that
    the ranks draw different dropout masks."""
    torch.manual_seed(config.train.seed)
    model = GPT(config.model).to(device)
    if start:
        model.load_state_dict(start["model"])
    torch.manual_seed(config.train.seed + rank)
    return model


def data_vocabulary(config: Config, resume_state: dict | None, start: dict | None) -> tuple[list[str] | str | None, str]:
    """The vocabulary the run's data must be encoded with (None: the text's own characters), and
    whose it is, for a refusal: a checkpoint's wins over data.vocab."""
    if resume_state:
        return resume_state["vocab"], "the checkpoint being resumed"
    if start:
        return start["vocab"], f"the checkpoint being fine-tuned (train.init_from {config.train.init_from})"
    return ("bytes" if config.data.vocab == "bytes" else None), "data.vocab=bytes"


def starting_weights(config: Config, log) -> dict | None:
    """train.init_from: the weights and vocabulary to start from, the checkpoint's model shape put
    into config.model. A model key that the run set to another value is refused: it could not
    load those weights."""
    path = Path(config.train.init_from) if config.train.init_from else None
    if path is None:
        return None
    state = checkpoint.load(path)
    if state["format"] != checkpoint.FORMAT:
        raise UserInputError(f"train.init_from {path} is {shown(state.get('mode'))}-quantized; start from the fp32 "
                             "ckpt.pt of `gptcore train` or `gptcore import`")
    saved = config_from_dict(state["config"], f"the config in {path}")
    if asked := [c for c in resume_conflicts(saved, config, ARCHITECTURE_KEYS) if c.split("=")[0] in config.given_keys]:
        raise UserInputError(f"train.init_from {path} holds another model ({', '.join(asked)}); drop those model.* "
                             "settings: a fine-tuning run takes the checkpoint's shape")
    for key in ARCHITECTURE_KEYS:
        setattr(config.model, key.split(".")[1], getattr(saved.model, key.split(".")[1]))
    check_header_fits_file(saved, "fp32", path.stat().st_size, path)
    try:
        tokenizer_for(state["vocab"], saved.model.vocab_size)
        model = GPT(saved.model, init_weights=False)
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise UserInputError(f"train.init_from {path} is damaged or from another version "
                             f"({checkpoint.one_line(err, 160)})") from None
    if bad := checkpoint.first_non_finite(state["model"]):
        raise UserInputError(f"train.init_from {path} holds NaN or infinite weights ({bad}); start from an earlier "
                             "checkpoint")
    log(f"starting from the weights of {path} ({saved.model.n_layer} layers x {saved.model.n_embd}, "
        f"{vocabulary_name(state['vocab'])}), with a fresh optimizer and schedule")
    return {"model": model.state_dict(), "vocab": state["vocab"]}
