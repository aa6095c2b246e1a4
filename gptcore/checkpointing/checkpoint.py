"""Checkpoints: atomic files that load without running pickle code, written in the background.

A checkpoint is a plain dict of tensors, numbers, strings and lists saved with torch.save and
read back with `weights_only=True`, so a file from elsewhere cannot execute code on load. It is
written to a temporary file in the same directory, fsynced, then renamed over the old one: a
crash mid-save leaves the previous checkpoint intact.

`Checkpointer` is the trainer's one component for saving: it copies the state to host memory
(the only part the training loop waits for) and writes the file in a background thread, one
save in flight at a time. Each rank's random generators (the CPU one and its own GPU's) are
gathered into the file, so a resumed run draws the same dropout masks on every rank.
"""

from __future__ import annotations

import errno
import os
import re
import threading
import zipfile
from pathlib import Path

import torch

from gptcore.cluster import distributed
from gptcore.config import Config, config_from_dict, resume_conflicts
from gptcore.data.corpus import tokenizer_for
from gptcore.errors import TrainingFailure, UserInputError, shown
from gptcore.files import atomic_write
from gptcore.models.gpt import parameter_count

FORMAT = "gptcore-checkpoint"
FORMAT_VERSION = 1


def save(state: dict, path: Path) -> None:
    atomic_write(path, lambda handle: torch.save(state, handle))


def damaged_record(source) -> str | None:
    """What is wrong with a checkpoint's archive (a path or an open file), or None: a record whose bytes do
    not match their CRC-32, or a compressed one (torch.save stores records as they are; a
    compressed record could unpack to any size).

    torch.save writes a zip archive with a CRC-32 of every record, the pickled header as well as
    each tensor's bytes, but torch.load never checks them: a file damaged on disk or in transfer
    (flipped bytes) loads silently. Checking them costs the save nothing. It is no defence
    against someone who rewrites the file, CRCs included: the loaders' own checks of names,
    shapes and values are."""
    with zipfile.ZipFile(source) as archive:
        packed = next((info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED), None)
        if packed:
            return f"{packed} is compressed, which torch.save never does"
        bad = archive.testzip()
    return f"{bad} does not match the CRC-32 stored for it" if bad else None


def read_archive(path: Path) -> object:
    """What torch.save wrote to path, read without running pickle code, or one clear
    UserInputError (missing, truncated, damaged, or wanting to run code). The file is opened
    once: a training that replaces it meanwhile (a rename) leaves this read on the file it opened,
    so the bytes checked are the bytes loaded."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{path} is a directory{foreign_directory(path)}")
    missing = f"checkpoint {path} does not exist; train a model first or check the path"
    if not path.is_file():  # nor a FIFO or a device, which open() would wait on or read without end
        raise UserInputError(missing)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise UserInputError(missing) from None
    with handle:
        return read_open_archive(handle, path)


def read_open_archive(handle, path: Path) -> object:
    unreadable = ("checkpoint {path} cannot be read (truncated, corrupt or not a gptcore checkpoint: {reason}); "
                  "use another checkpoint or retrain")
    if is_safetensors(handle):
        raise UserInputError(f"{path} is a safetensors file, which holds weights without a model config or "
                             "vocabulary; gptcore reads gptcore checkpoints (for a Hugging Face export, load its "
                             "directory with transformers)")
    try:
        damaged = damaged_record(handle)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:  # torch.save writes zip archives only
        raise UserInputError(unreadable.format(path=path, reason=str(err)[:160] or type(err).__name__)) from None
    if damaged:
        raise UserInputError(f"checkpoint {path} fails its integrity check ({damaged}): the file is damaged; "
                             "use another checkpoint or retrain")
    handle.seek(0)
    try:
        return torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or foreign files
        text = str(err).strip()
        unsafe = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
        if unsafe:  # weights_only refused to run pickle code: say what the file wanted to run
            raise UserInputError(f"checkpoint {path} wants to run code when loaded (it names {unsafe.group(1)}); "
                                 "gptcore loads only plain tensors and values, so it is refused: use a checkpoint "
                                 "written by `gptcore train` or `gptcore quantize`") from None
        reason = text.splitlines()[0][:160] if text else type(err).__name__
        raise UserInputError(unreadable.format(path=path, reason=reason)) from None


def is_safetensors(handle) -> bool:
    """safetensors files start with the 8-byte length of a JSON header, which opens with '{'."""
    handle.seek(0)
    head = handle.read(9)
    size = os.fstat(handle.fileno()).st_size
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size


def foreign_directory(path: Path) -> str:
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return (", a Hugging Face model; gptcore reads its own checkpoints: load this one with transformers "
                "(AutoModelForCausalLM.from_pretrained), or pass the ckpt.pt it was exported from")
    if (path / "ckpt.pt").is_file():
        return f"; pass the checkpoint inside it: --ckpt {path / 'ckpt.pt'}"
    return "; pass a checkpoint file (ckpt.pt)"


def first_non_finite(tensors: dict) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None: a file whose
    checksums are right can still hold weights that compute nothing but NaN."""
    return next((name for name, tensor in tensors.items()
                 if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()),
                None)


def one_line(err: BaseException, limit: int = 200) -> str:
    """An exception's text on one line (torch's size-mismatch message spans several)."""
    return " ".join(str(err).split())[:limit]


BYTES_PER_PARAMETER = {"fp32": 4, "bf16": 2, "int8": 1, "int4": 0.5}


def check_header_fits_file(config, kind: str, file_bytes: int, path: Path) -> None:
    """A header may describe a model no larger than its file can hold: a 40 KB file claiming
    100,000 layers is refused before anything is built (which would take minutes and GBs)."""
    needed = parameter_count(config.model) * BYTES_PER_PARAMETER.get(kind, 4)
    if needed > 1.05 * file_bytes + 2**20:
        raise UserInputError(f"checkpoint {path} describes a model of {parameter_count(config.model):,} parameters "
                             f"({needed / 1e6:,.0f} MB as {kind}) in a {file_bytes / 1e6:,.1f} MB file: its header "
                             "was altered or the file is cut short; use another checkpoint or retrain")


def load(path: Path, expected_format: str | None = None) -> dict:
    """Read a gptcore checkpoint or raise one clear UserInputError, which names what a foreign
    file is (a nanoGPT checkpoint, a Hugging Face directory, safetensors) and how to convert it."""
    state = read_archive(path)
    if isinstance(state, dict) and "model_args" in state and "model" in state:
        raise UserInputError(f"{path} is a nanoGPT checkpoint; convert it first: gptcore import --nanogpt {path} "
                             f"--meta data/<dataset>/meta.pkl --out ckpt.pt")
    if not isinstance(state, dict) or "format" not in state:
        raise UserInputError(f"{path} is not a gptcore checkpoint; pass a ckpt.pt written by `gptcore train`")
    if expected_format and state["format"] != expected_format:
        raise UserInputError(f"{path} is a {shown(state['format'])} file, expected {expected_format}")
    return state


def check_resumable(state: dict, config: Config, where: Path) -> dict:
    """A checkpoint's state, once its vocabulary is whole and its model is the one asked for."""
    saved = config_from_dict(state["config"], f"the config in {where}")
    try:
        tokenizer_for(state.get("vocab"), saved.model.vocab_size)
    except ValueError as err:
        raise UserInputError(f"checkpoint {where} is damaged or from another version ({err}); "
                             "use another checkpoint or retrain") from None
    if conflicts := resume_conflicts(saved, config):
        raise UserInputError(f"{where} holds another model or optimizer ({', '.join(conflicts)}); resume with the "
                             "checkpoint's settings, or train into another out_dir")
    if isinstance(state.get("model"), dict) and (bad := first_non_finite(state["model"])):
        raise UserInputError(f"checkpoint {where} holds NaN or infinite weights ({bad}), which training never saves: "
                             "the file was altered; use another checkpoint or train into another out_dir")
    return state


# -- random generators ------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict:
    """This rank's global generators that training draws from (dropout, init): the CPU one, and
    the one of the GPU it trains on. The data has its own generator."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def gather_rng_states(device: torch.device) -> list[dict]:
    """Every rank's rng_state, in rank order (collective: every rank calls it). The states travel
    as byte tensors on the training device, which is what NCCL can send."""
    own = rng_state(device)
    gathered = {name: distributed.gather_tensors(state.to(device)) for name, state in own.items()}
    return [{name: states[rank].cpu() for name, states in gathered.items()}
            for rank in range(len(gathered["torch"]))]


def restore_rng_state(states: list[dict], rank: int, device: torch.device) -> bool:
    """Set this rank's generators from a checkpoint's list; False when the checkpoint had fewer
    ranks than this run (this rank then keeps its fresh seed). A GPU state is set only on a GPU:
    a checkpoint from a GPU run resumes on the CPU and the other way round."""
    if rank >= len(states):
        return False
    state = states[rank]
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and isinstance(state.get("cuda"), torch.Tensor):
        torch.cuda.set_rng_state(state["cuda"], device)
    return True


# -- saving in the background --------------------------------------------------------------------

def to_host(tree):
    """A copy of a nested state (dicts, lists, tensors) with every tensor on the CPU, for a
    background thread to serialize while training goes on changing the originals. GPU tensors go
    to pinned memory without a wait each, then one synchronization; tensors that share storage
    (the tied embedding and head) stay shared, so the file holds them once."""
    copies: dict[tuple, torch.Tensor] = {}
    on_gpu = False

    def copy(value):
        nonlocal on_gpu
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                   value.stride(), value.dtype, value.device)
            if key not in copies:
                if value.is_cuda:
                    on_gpu = True
                    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
                    copies[key] = host.copy_(value.detach(), non_blocking=True)
                else:
                    copies[key] = value.detach().clone()
            return copies[key]
        if isinstance(value, dict):
            return {k: copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(v) for v in value)
        return value

    result = copy(tree)
    if on_gpu:
        torch.cuda.synchronize()
    return result


def write_failure(path: Path, err: OSError, kept: str) -> TrainingFailure:
    """One line for a checkpoint that could not be written."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return TrainingFailure(f"no space left on the device to write {path} ({err.strerror}); {kept}; "
                               "free space or point out_dir elsewhere, then rerun with resume=auto")
    return TrainingFailure(f"could not write {path} ({err.strerror or err}); {kept}")


class Checkpointer:
    """A run's checkpoint: finding and restoring it, and saving without stalling training.

    save() gathers every rank's generators, copies the state to host memory and returns; a
    background thread writes the file atomically. A second save first waits for the one in
    flight, so at most one copy of the state is held and the file on disk is always a whole
    checkpoint. A failed write surfaces, as one line, at the next save() or wait()."""

    def __init__(self, path: Path, device: torch.device, rank: int, background: bool = True):
        self.path = Path(path)
        self.device, self.rank = device, rank
        self.background = background
        self.thread: threading.Thread | None = None
        self.error: TrainingFailure | None = None
        self.saved_step: int | None = None  # the newest step whose file is complete on disk

    def existing(self, config: Config) -> dict | None:
        """The checkpoint to resume from, if any. Refuses to overwrite a run unless resume=auto, and
        to resume one whose model is laid out differently from the one asked for."""
        if not self.path.exists():
            return None
        if config.resume != "auto":
            raise UserInputError(
                f"{self.path} already exists; pass resume=auto to continue that run or choose another out_dir")
        return check_resumable(load(self.path, FORMAT), config, self.path)

    def kept(self) -> str:
        """What survives a failure, for its message."""
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"{self.path} (step {self.saved_step}) is kept"

    def restore(self, state: dict, model: torch.nn.Module, optimizer, data) -> tuple[int, float]:
        """Load a checkpoint into the run's objects; returns (step, best validation loss)."""
        try:
            step, best = int(state["step"]), float(state["best_val_loss"])
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            data.load_state_dict(state["data"])
            restore_rng_state(state["rng"], self.rank, self.device)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
            raise UserInputError(f"checkpoint {self.path} is damaged or from another version "
                                 f"({type(err).__name__} while restoring it); use another checkpoint or retrain") from None
        self.saved_step = step
        return step, best

    def save(self, step: int, model: torch.nn.Module, optimizer, data, **run: object) -> None:
        """Collective: every rank calls it, rank 0 writes. `run` adds the run's description
        (config, vocab, world_size, best_val_loss). Blocks only for the copy to host memory."""
        rng = gather_rng_states(self.device)
        if self.rank != 0:
            return
        self.wait()
        snapshot = to_host({"format": FORMAT, "version": FORMAT_VERSION, "step": step,
                            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "data": data.state_dict(), "rng": rng, **run})
        if not self.background:
            self._write(snapshot)
            self.wait()
            return
        self.thread = threading.Thread(target=self._write, args=(snapshot,), name="gptcore-checkpoint")
        self.thread.start()

    def _write(self, snapshot: dict) -> None:
        try:
            save(snapshot, self.path)
            self.saved_step = snapshot["step"]
        except OSError as err:
            kept = (f"the previous checkpoint (step {self.saved_step}) is kept" if self.saved_step is not None
                    else f"{self.path} was not changed")
            self.error = write_failure(self.path, err, kept)

    def wait(self) -> None:
        """Until the save in flight is on disk; raises its failure, once."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
