"""nanoGPT's checkpoints in and out.

    gptcore import --nanogpt out-shakespeare-char/ckpt.pt --meta data/shakespeare_char/meta.pkl --out ckpt.pt
    gptcore export --ckpt runs/cpu/ckpt.pt --format nanogpt --out runs/cpu/nanogpt

nanoGPT saves {model, optimizer, model_args, iter_num, best_val_loss, config} with torch.save,
the model's names prefixed `_orig_mod.` when it was compiled, and a character vocabulary in
data/<dataset>/meta.pkl ({vocab_size, itos, stoi}), a pickle. Both models are GPT-2 under the same
names, so the weights carry over as they are. The checkpoint is read like ours (no pickle code
runs); meta.pkl is read by an unpickler that builds only plain values and refuses anything else.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from gptcore.checkpointing import checkpoint
from gptcore.checkpointing.checkpoint import check_header_fits_file
from gptcore.config import Config, ModelConfig, config_from_dict
from gptcore.errors import UserInputError, shown
from gptcore.models.gpt import GPT

MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
COMPILED_PREFIX = "_orig_mod."
MAX_META_BYTES = 16 * 2**20  # a character vocabulary is a few KB


class PlainUnpickler(pickle.Unpickler):
    """Builds dicts, lists, strings and numbers only: anything that would name a class or a
    function (the way a pickle runs code) is refused before it is looked up."""

    def __init__(self, payload: bytes, source: Path):
        super().__init__(io.BytesIO(payload))
        self.source = source

    def find_class(self, module: str, name: str):
        raise UserInputError(f"{self.source} wants to run code when unpickled (it names {module}.{name}); a "
                             "nanoGPT meta.pkl holds only a vocabulary, so it is refused and nothing ran")

    def persistent_load(self, pid):
        raise UserInputError(f"{self.source} refers to objects outside itself; it is not a nanoGPT meta.pkl")


def read_vocabulary(path: Path) -> list[str]:
    """The character vocabulary of a nanoGPT meta.pkl, by token id."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"--meta {path} does not exist; nanoGPT's prepare.py writes data/<dataset>/meta.pkl")
    if path.stat().st_size > MAX_META_BYTES:
        raise UserInputError(f"--meta {path} is {path.stat().st_size / 2**20:.0f} MiB, too large for a vocabulary")
    try:
        meta = PlainUnpickler(path.read_bytes(), path).load()
    except UserInputError:
        raise
    except Exception as err:  # a damaged pickle raises anything from EOFError to ValueError
        raise UserInputError(f"--meta {path} is not a readable pickle ({type(err).__name__}: {str(err)[:120]})") from None
    itos = meta.get("itos") if isinstance(meta, dict) else None
    if not isinstance(itos, dict) or sorted(itos) != list(range(len(itos))) or not all(
            isinstance(ch, str) and len(ch) == 1 for ch in itos.values()) or len(set(itos.values())) != len(itos):
        raise UserInputError(f"--meta {path} has no character vocabulary (itos: token ids 0..N-1 to distinct "
                             f"characters); got {shown(meta)}")
    return [itos[i] for i in range(len(itos))]


def model_config(model_args: object, source: Path) -> ModelConfig:
    if not isinstance(model_args, dict) or not set(MODEL_ARGS) <= set(model_args):
        raise UserInputError(f"{source} has no nanoGPT model_args with {', '.join(MODEL_ARGS)}")
    try:
        return config_from_dict({"model": {key: model_args[key] for key in MODEL_ARGS}}, f"model_args of {source}").model
    except UserInputError as err:
        raise UserInputError(f"{source}: {err}") from None


def gptcore_weights(state: object, source: Path) -> dict[str, torch.Tensor]:
    """nanoGPT's state dict under our names: the compile prefix dropped, and the causal-mask
    buffers (`attn.bias`, kept by nanoGPT where flash attention is missing) left out."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserInputError(f"{source} has no state dict of tensors under 'model'")
    weights = {}
    for name, tensor in state.items():
        name = name[len(COMPILED_PREFIX):] if name.startswith(COMPILED_PREFIX) else name
        if not name.endswith(".attn.bias"):
            weights[name] = tensor
    return weights


def sorted_vocabulary(vocab: list[str], weights: dict[str, torch.Tensor]) -> list[str]:
    """gptcore's vocabulary is sorted (its fast encoder relies on it): a nanoGPT vocabulary in
    another order is sorted and the embedding rows (the tied head with them) follow."""
    order = sorted(range(len(vocab)), key=vocab.__getitem__)
    if order != list(range(len(vocab))):
        for name in ("transformer.wte.weight", "lm_head.weight"):
            if name in weights:
                weights[name] = weights[name][order]
    return [vocab[i] for i in order]


def import_checkpoint(source: Path, meta: Path | None) -> tuple[dict, str]:
    """A weights-only gptcore checkpoint of a nanoGPT file, and a line describing it."""
    state = checkpoint.read_archive(source)
    if not isinstance(state, dict) or "model_args" not in state or "model" not in state:
        raise UserInputError(f"{source} is not a nanoGPT checkpoint (no model_args and model)")
    model = model_config(state["model_args"], source)
    dataset = (state.get("config") or {}).get("dataset") if isinstance(state.get("config"), dict) else None
    if meta is None:
        hint = f"data/{dataset}/meta.pkl" if isinstance(dataset, str) and dataset.isprintable() else "data/<dataset>/meta.pkl"
        raise UserInputError(f"gptcore is character-level and needs the model's vocabulary: pass --meta {hint} "
                             "(written by nanoGPT's prepare.py)")
    vocab = read_vocabulary(meta)
    if len(vocab) != model.vocab_size:
        raise UserInputError(f"{meta} has {len(vocab)} characters but {source} was trained for {model.vocab_size} "
                             "tokens; pass the meta.pkl of the model's own dataset")
    weights = gptcore_weights(state["model"], source)
    vocab = sorted_vocabulary(vocab, weights)
    check_header_fits_file(Config(model=model), "fp32", Path(source).stat().st_size, Path(source))
    gpt = GPT(model, init_weights=False)
    try:
        gpt.load_state_dict(weights)
    except RuntimeError as err:
        raise UserInputError(f"{source}'s weights do not fit its model_args ({str(err).splitlines()[0][:160]})") from None
    config = Config(model=model)
    if isinstance(dataset, str) and dataset.isprintable():
        config.data.path = dataset  # a name, never read here: eval and fine-tuning take --data / data.path
    step = state.get("iter_num") if isinstance(state.get("iter_num"), int) else 0
    converted = {"format": checkpoint.FORMAT, "version": checkpoint.FORMAT_VERSION, "step": step,
                 "config": config.to_dict(), "vocab": vocab,
                 "model": {name: tensor.float() for name, tensor in gpt.state_dict().items()},
                 "imported_from": f"nanoGPT {source}"}
    return converted, (f"{model.n_layer} layers x {model.n_head} heads x {model.n_embd}, block {model.block_size}, "
                       f"{len(vocab)} characters, nanoGPT step {step}")


def nanogpt_files(state: dict, model: ModelConfig, vocab: list[str], dataset: str, step: int,
                  best_val_loss: float) -> dict[str, bytes]:
    """ckpt.pt and meta.pkl as nanoGPT's train.py and prepare.py write them (no optimizer state:
    nanoGPT's sample.py needs none; its init_from='resume' would)."""
    nanogpt = {"model": dict(state), "model_args": {key: getattr(model, key) for key in MODEL_ARGS},
               "iter_num": step, "best_val_loss": best_val_loss, "config": {"dataset": dataset}}
    buffer = io.BytesIO()
    torch.save(nanogpt, buffer)
    return {"ckpt.pt": buffer.getvalue(), "meta.pkl": meta_pickle(vocab)}


def meta_pickle(vocab: list[str]) -> bytes:
    """A character vocabulary as nanoGPT's prepare.py writes it to data/<dataset>/meta.pkl."""
    meta = {"vocab_size": len(vocab), "itos": dict(enumerate(vocab)), "stoi": {ch: i for i, ch in enumerate(vocab)}}
    return pickle.dumps(meta)
