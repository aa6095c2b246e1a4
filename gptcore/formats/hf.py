"""A trained model as a Hugging Face GPT-2 directory, which `transformers` loads with no gptcore code.

    gptcore export --ckpt runs/cpu/ckpt.pt --format hf --out runs/cpu/hf

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("runs/cpu/hf")
    tokenizer = AutoTokenizer.from_pretrained("runs/cpu/hf")

Our model is GPT-2's architecture under GPT-2's parameter names: pre-norm blocks, fused QKV,
exact (erf) GELU, a head tied to the token embedding. The differences are layout only: GPT-2's
Conv1D stores its matrices as (in, out), where nn.Linear stores (out, in), and a model trained
with model.bias=false has no biases, which GPT-2 always has: they are written as zeros, which
computes the same. The tokenizer is one token per character of our vocabulary with the same ids,
joined without spaces on decode; characters outside the vocabulary have no token and are dropped
(gptcore refuses them instead). A bytes model (data.vocab=bytes) gets a byte-level tokenizer whose
ids are the UTF-8 bytes, as ours are.
"""

from __future__ import annotations

import json

import torch

from gptcore.config import ModelConfig

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which gptcore's LayerNorm keeps


def hf_config(model: ModelConfig) -> dict:
    """config.json of the GPT2LMHeadModel that computes what GPT(model) computes."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": model.vocab_size, "n_positions": model.block_size, "n_embd": model.n_embd,
        "n_layer": model.n_layer, "n_head": model.n_head, "n_inner": 4 * model.n_embd,
        "activation_function": "gelu",  # exact GELU, as F.gelu; GPT-2's own "gelu_new" is the tanh form
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": model.dropout, "embd_pdrop": model.dropout, "attn_pdrop": model.dropout,
        "scale_attn_weights": True, "tie_word_embeddings": True,
        # GPT-2's defaults name token 50256, which a character vocabulary does not have.
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
        "torch_dtype": "float32",
    }


def hf_weights(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict under GPT-2's layout: Conv1D matrices transposed, zero biases where we
    have none, the tied head left out (transformers ties it back to the token embedding)."""
    weights = {}
    for name, tensor in with_zero_biases(state, model).items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach().to(torch.float32)
        weights[name] = (tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor).contiguous().clone()
    return weights


def with_zero_biases(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """The state dict with every bias GPT-2's architecture has (and Hugging Face and llama.cpp
    require): a model trained with model.bias=false gets zeros, which compute the same."""
    if model.bias:
        return dict(state)
    widths = {"ln_1": model.n_embd, "ln_2": model.n_embd, "attn.c_attn": 3 * model.n_embd,
              "attn.c_proj": model.n_embd, "mlp.c_fc": 4 * model.n_embd, "mlp.c_proj": model.n_embd}
    biases = {f"transformer.h.{layer}.{part}.bias": torch.zeros(width)
              for layer in range(model.n_layer) for part, width in widths.items()}
    return {**state, **biases, "transformer.ln_f.bias": torch.zeros(model.n_embd)}


def byte_stand_ins() -> list[str]:
    """GPT-2's byte-level alphabet: byte b as itself where that is a printable Latin-1 character,
    else as chr(256 + n) for the n-th byte that is not; tokenizers' ByteLevel steps use this table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


def tokenizer_files(vocab: list[str] | str, block_size: int) -> dict[str, bytes]:
    """tokenizer.json and tokenizer_config.json for our ids. Characters: a BPE model with no
    merges splits text into characters, and the Fuse decoder joins tokens as they are. Bytes
    (data.vocab=bytes): the ByteLevel steps turn UTF-8 bytes into GPT-2's byte alphabet and back,
    and the alphabet's n-th character is token n, so the ids are the bytes."""
    if vocab == "bytes":
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        tokens, pre_tokenizer, decoder = byte_stand_ins(), byte_level, byte_level
    else:
        tokens, pre_tokenizer, decoder = vocab, None, {"type": "Fuse"}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": decoder,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {ch: i for i, ch in enumerate(tokens)}, "merges": []},
    }
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": block_size,
                "clean_up_tokenization_spaces": False}  # decode must not drop the space before "." or ","
    return {"tokenizer.json": json_bytes(tokenizer), "tokenizer_config.json": json_bytes(settings)}


def json_bytes(tree: dict) -> bytes:
    return (json.dumps(tree, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def hf_directory(state: dict[str, torch.Tensor], model: ModelConfig, vocab: list[str] | str) -> dict[str, bytes]:
    """The files of the Hugging Face directory, by name."""
    from safetensors.torch import save as safetensors_bytes

    return {"config.json": json_bytes(hf_config(model)),
            "model.safetensors": safetensors_bytes(hf_weights(state, model), metadata={"format": "pt"}),
            **tokenizer_files(vocab, model.block_size)}
