"""Data parallelism, the one choice of how ranks share the model: `train.parallel`.

  ddp   every rank holds the whole model, its gradients and AdamW's state (16 bytes a parameter
        in fp32); gradients are all-reduced after backward, bucket by bucket (PyTorch's DDP).
  fsdp  every rank holds 1/N of each of them (PyTorch's FSDP2, `fully_shard`, per transformer
        block and at the root): a block's weights are all-gathered just before its forward and
        again before its backward (or kept from forward: train.reshard_after_forward=false), and
        its gradients reduce-scattered, each rank keeping the part it owns.

The model itself never learns of ranks: the trainer calls `parallelize`, then uses the returned
`Parallel` to skip gradient sync between micro-steps and to clip gradients.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from gptcore.cluster import distributed
from gptcore.config import ModelConfig
from gptcore.models.gpt import parameter_count

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Parallel:
    strategy: str  # ddp | fsdp
    compute_model: torch.nn.Module  # what the training step calls (wrapped, maybe compiled)
    model: torch.nn.Module  # the module that holds the parameters (under fsdp: sharded in place)
    ddp: torch.nn.Module | None = None

    @contextmanager
    def gradient_sync(self, enabled: bool):
        """Gradients are reduced across ranks only on the last micro-step of an optimizer step;
        before it, each rank accumulates its own (DDP's no_sync; FSDP2 keeps unsharded gradients)."""
        if self.strategy == "fsdp" and distributed.is_initialized():
            self.model.set_requires_gradient_sync(enabled)
            yield
        elif self.ddp is not None and not enabled:
            with self.ddp.no_sync():
                yield
        else:
            yield

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        """Clip to max_norm over all ranks' gradients; the total norm before clipping, a plain
        tensor on every rank (under fsdp the norm of the sharded gradients is reduced over ranks)."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of a tensor this rank holds: its shard of an FSDP parameter, or all of a plain one."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def checkpoint_activations(model: torch.nn.Module) -> None:
    """train.activation_checkpointing: keep only each block's input in forward and compute its
    activations again in backward (about a third more compute, activation memory of one block).
    The block's own forward is wrapped, not the call, so that FSDP's hooks around the block run
    once: its weights are gathered for the recomputation by the hook before the block's backward."""
    for block in model.transformer.h:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def mixed_precision(dtype: torch.dtype | None):
    """FSDP computes in dtype (the gathered weights are cast once), keeps fp32 master weights and
    reduces gradients in fp32; None: all fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)


def parallelize(model: torch.nn.Module, device: torch.device, strategy: str, compile_model: bool,
                compute_dtype: torch.dtype | None = None, reshard_after_forward: bool = True,
                activation_checkpointing: bool = False, comm_hook=None) -> Parallel:
    """Make the model data-parallel over the process group (if there is one). DDP goes inside
    torch.compile, so that compile splits the graph at DDP's bucket boundaries and the all-reduce
    of one bucket overlaps the backward of the next; comm_hook, if given, all-reduces each DDP
    bucket (profiling.AllReduceTimer.hook times them). FSDP shards each block, then the root (the
    embeddings, the tied head and the final norm); compiled, each block is compiled on its own
    before it is sharded (as torchtitan does), and the root is left eager: its all-gathers and
    reduce-scatters run from hooks around each block, which a graph of the whole model would have
    to trace through."""
    if activation_checkpointing:
        checkpoint_activations(model)
    ddp = None
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        policy = mixed_precision(compute_dtype)
        for block in model.transformer.h:
            if compile_model:
                block.compile()
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        # The root's weights are needed again at once by the head's backward: never resharded.
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        return Parallel(strategy, model, model)
    elif distributed.is_initialized():
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        if comm_hook is not None:
            ddp.register_comm_hook(None, comm_hook)
        compute = ddp
    else:
        compute = model
    return Parallel(strategy, torch.compile(compute) if compile_model else compute, model, ddp)


def estimated_memory(model: ModelConfig, rows_per_rank: int, strategy: str, world_size: int,
                     activation_checkpointing: bool = False) -> tuple[float, float]:
    """(training state, activations) in bytes per rank, before anything is allocated. The state:
    fp32 weights, gradients and AdamW's two moments, 16 bytes a parameter, 1/N of it under fsdp,
    which holds two blocks' weights gathered at a time (one computing, one prefetched). The
    activations of one micro-batch: about 68 bytes per token, layer and channel in fp32 (after
    Korthikanti et al., with flash attention; one block's and the inputs of the others under
    activation checkpointing), plus the logits."""
    params = parameter_count(model)
    state = 16 * params
    if strategy == "fsdp":
        block = parameter_count(dataclasses.replace(model, n_layer=1)) - parameter_count(
            dataclasses.replace(model, n_layer=0))
        state = state / world_size + 2 * 4 * block
    tokens = rows_per_rank * model.block_size
    per_layer = 68 * model.n_embd
    layers = (model.n_layer * 4 * model.n_embd + per_layer) if activation_checkpointing else model.n_layer * per_layer
    return state, tokens * (layers + 12 * model.vocab_size)


def tensor_bytes(tensors) -> int:
    """Bytes of the parts of tensors this rank holds, each storage counted once (the tied head)."""
    seen, total = set(), 0
    for tensor in tensors:
        part = local(tensor)
        key = (part.untyped_storage().data_ptr(), part.storage_offset(), part.numel())
        if key not in seen:
            seen.add(key)
            total += part.numel() * part.element_size()
    return total


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds of the training state, exact from its own tensors: parameters,
    gradients (call it after backward, before zero_grad) and the optimizer's state (after its
    first step, when AdamW has made its moments)."""
    params = list(model.parameters())
    moments = [value for state in optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor)]
    return {"param_bytes": tensor_bytes(params),
            "grad_bytes": tensor_bytes(p.grad for p in params if p.grad is not None),
            "optimizer_bytes": tensor_bytes(moments)}


def peak_memory(device: torch.device) -> dict[str, int]:
    """The most device memory PyTorch has had allocated on this rank's GPU since it started."""
    return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device)} if device.type == "cuda" else {}


def describe_memory(record: dict) -> str:
    mib = lambda key: f"{record[key] / 2**20:,.1f}"  # noqa: E731
    peak = f", peak device memory {mib('peak_memory_bytes')} MiB" if "peak_memory_bytes" in record else ""
    return (f"memory per rank: parameters {mib('param_bytes')} MiB, gradients {mib('grad_bytes')} MiB, "
            f"optimizer {mib('optimizer_bytes')} MiB{peak}")
