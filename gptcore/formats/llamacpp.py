"""A trained model as one GGUF file, for llama.cpp and what is built on it (llama-cli,
llama-cpp-python, ollama, LM Studio).

    gptcore export --ckpt runs/cpu/ckpt.pt --format gguf --type q8_0 --out runs/cpu/model-q8_0.gguf
    llama-cli -m runs/cpu/model-q8_0.gguf -p "ROMEO:" -n 100 --temp 0 -no-cnv

llama.cpp's `gpt2` architecture computes what our GPT-2 block does: learned positions, pre-norm
LayerNorm, fused QKV, GELU, biases everywhere (zeros where model.bias=false), and a head tied to
the token embedding unless an `output.weight` is given (an untied head, model.tie_head=false, is
written as one). It computes GELU by the tanh approximation where we use the exact one, which
moves a logit by about 1e-3. The other block options have no place in `gpt2` and are refused.

The vocabulary is written as llama.cpp's `rwkv` tokenizer, whose tokens are byte strings matched
longest first (escaped in the file: `\\\\`, `\\xNN`), so a character or a byte vocabulary keeps
our ids. It has no BOS or EOS token. A prompt byte that no token matches becomes the unknown
token, which is set to the space (token 0 where the vocabulary has no space); `gptcore sample`
refuses such a prompt instead.

Types: f32; f16 (the matrices halved); q8_0 (every matrix in blocks of 32 weights with one f16
scale, as our int8 keeps one scale per row); q4_0 (the blocks' matrices 4-bit in blocks of 32;
the embeddings and an untied head q8_0, as our int4 keeps them int8).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from gptcore.config import ModelConfig, non_gpt2_options
from gptcore.errors import UserInputError
from gptcore.files import atomic_path
from gptcore.formats.hf import LAYER_NORM_EPS, with_zero_biases

TYPES = ("f32", "f16", "q8_0", "q4_0")
QUANT_BLOCK = 32  # weights per scale in q8_0 and q4_0, along each row
TOP_NAMES = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
             "lm_head.weight": "output.weight"}
BLOCK_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
               "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    """llama.cpp's name for one of our tensors: transformer.h.3.mlp.c_fc.weight -> blk.3.ffn_up.weight."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, _, layer, rest = name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{BLOCK_NAMES[part]}.{kind}"


def escaped_token(piece: bytes) -> str:
    """A token's bytes as the rwkv tokenizer stores them: printable ASCII as is, the backslash
    doubled, every other byte as \\xNN (llama.cpp parses lowercase hex digits only)."""
    return "".join("\\\\" if b == 0x5C else chr(b) if 0x20 <= b < 0x7F else f"\\x{b:02x}" for b in piece)


def token_pieces(vocab: list[str] | str) -> list[bytes]:
    """Each token id's bytes: a character's UTF-8 encoding, or the byte itself under data.vocab=bytes."""
    if vocab == "bytes":
        return [bytes([i]) for i in range(256)]
    return [ch.encode("utf-8") for ch in vocab]


def unknown_token(pieces: list[bytes]) -> int:
    return pieces.index(b" ") if b" " in pieces else 0


def storage_type(name: str, tensor: torch.Tensor, kind: str):
    """How one tensor is stored for --type kind: vectors always f32 (llama.cpp's own converter
    does the same), q4_0 on the blocks' matrices only."""
    from gguf import GGMLQuantizationType as T

    if tensor.dim() == 1 or kind == "f32":
        return T.F32
    if kind == "f16":
        return T.F16
    return T.Q4_0 if kind == "q4_0" and name.startswith("blk.") else T.Q8_0


def check_expressible(model: ModelConfig, kind: str, source: str) -> None:
    """Refuse, in one line, what the file cannot hold, before anything is written."""
    if kind not in TYPES:
        raise UserInputError(f"--type {kind} is not a GGUF type gptcore writes; use one of {', '.join(TYPES)}")
    # gpt2 has a place for an untied head (output.weight), for no other block option.
    if options := [option for option in non_gpt2_options(model) if not option.startswith("model.tie_head=")]:
        raise UserInputError(f"{source} is trained with {', '.join(options)}, which llama.cpp's gpt2 architecture "
                             "cannot express; export it with --format gptcore, or train with those options at their "
                             "defaults (model.tie_head=false is fine)")
    if kind in ("q8_0", "q4_0") and model.n_embd % QUANT_BLOCK:
        raise UserInputError(f"--type {kind} packs each row in blocks of {QUANT_BLOCK} weights and n_embd "
                             f"{model.n_embd} is not a multiple of {QUANT_BLOCK}; use --type f16 or f32")


def gguf_tensors(state: dict[str, torch.Tensor], model: ModelConfig, kind: str):
    """(llama.cpp name, stored array, GGML type) for every tensor of the file, in our order."""
    from gguf.quants import quantize

    for name, tensor in with_zero_biases(state, model).items():
        if name == "lm_head.weight" and model.tie_head:
            continue  # llama.cpp ties the head back to token_embd when output.weight is absent
        name = gguf_name(name)
        qtype = storage_type(name, tensor, kind)
        yield name, quantize(tensor.detach().to(torch.float32).contiguous().numpy(), qtype), qtype


def write_gguf(path: Path, state: dict[str, torch.Tensor], model: ModelConfig, vocab: list[str] | str,
               name: str, kind: str) -> None:
    """The GGUF file, written whole or not at all."""
    import gguf

    writer = gguf.GGUFWriter(None, "gpt2")
    writer.add_name(name)
    writer.add_context_length(model.block_size)
    writer.add_embedding_length(model.n_embd)
    writer.add_feed_forward_length(4 * model.n_embd)
    writer.add_block_count(model.n_layer)
    writer.add_head_count(model.n_head)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pieces = token_pieces(vocab)
    writer.add_tokenizer_model("rwkv")
    writer.add_token_list([escaped_token(piece) for piece in pieces])
    writer.add_token_types([gguf.TokenType.NORMAL] * len(pieces))
    writer.add_unk_token_id(unknown_token(pieces))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    for tensor_name, array, qtype in gguf_tensors(state, model, kind):
        writer.add_tensor(tensor_name, np.ascontiguousarray(array), raw_dtype=qtype)
    with atomic_path(path) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        except OSError as err:
            # numpy's tofile reports a short write without an errno; on a disk that is now full,
            # that is ENOSPC, and it is said so in one line like every other writer's.
            if err.errno is None and shutil.disk_usage(path.parent).free < 2**20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
            raise
        finally:
            writer.close()


def describe_vocabulary(vocab: list[str] | str) -> str:
    """The vocabulary as the export line names it. llama.cpp's rwkv tokenizer (0.3.36) loops forever
    on a character outside the vocabulary whose first UTF-8 byte begins a vocabulary character
    (è beside é): it matches no token and starts again at the same byte. Only characters beyond
    ASCII can, so the line warns where there are any."""
    if vocab == "bytes":
        return "256-byte vocabulary"
    wide = [ch for ch in vocab if len(ch.encode("utf-8")) > 1]
    if not wide:
        return f"{len(vocab)}-character vocabulary"
    return (f"{len(vocab)}-character vocabulary, {len(wide)} of them beyond ASCII ({''.join(wide[:5])}"
            f"{'...' if len(wide) > 5 else ''}): llama.cpp hangs on a prompt character outside the vocabulary that "
            "begins with the same byte as one of them, so keep its prompts within the vocabulary")
