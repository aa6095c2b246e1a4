"""Atomic checkpoints that load without running pickle code.

A checkpoint is a plain dict of tensors, numbers, strings and lists saved with torch.save and
read back with `weights_only=True`, so a file from elsewhere cannot execute code on load. It is
written to a temporary file in the same directory, fsynced, then renamed over the old one: a
crash mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch

from gptcore.errors import UserInputError

FORMAT = "gptcore-checkpoint"
FORMAT_VERSION = 1


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode open() would, so shared run and
        # report directories stay readable by the group.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(state: dict, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load(path: Path, expected_format: str | None = None) -> dict:
    """Read a checkpoint or raise one clear UserInputError (missing, truncated, foreign)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"checkpoint {path} does not exist; train a model first or check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged or foreign files
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserInputError(
            f"checkpoint {path} cannot be read (truncated, corrupt or not a gptcore checkpoint: {reason}); "
            "use another checkpoint or retrain") from None
    if not isinstance(state, dict) or "format" not in state:
        raise UserInputError(f"{path} is not a gptcore checkpoint; pass a ckpt.pt written by `gptcore train`")
    if expected_format and state["format"] != expected_format:
        raise UserInputError(f"{path} is a {state['format']} file, expected {expected_format}")
    return state


def rng_state() -> dict:
    """The global generators that training draws from (dropout, init); the data has its own."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
