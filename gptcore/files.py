"""Files that are whole or absent: every file gptcore writes goes through here.

A file is written to a temporary name in its directory, fsynced, renamed over the old one, and
the directory fsynced: a crash or a full disk mid-write leaves the previous file intact, never a
torn one. (No torch here: data preparation uses it in processes that never import torch.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from gptcore.errors import UserInputError


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside path, for writers that open files by name (the gguf package's):
    when the block ends, the file is fsynced, renamed over path and the directory fsynced; when it
    raises, the file is removed and path is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the mode open() would, so shared run and
        # report directories stay readable by the group.
        os.fchmod(fd, 0o666 & ~current_umask())
        os.close(fd)
        yield Path(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise naming(err, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def naming(err: OSError, path: Path) -> OSError:
    """err with the file it was about: a write through a handle raises without one, and the
    message for a full disk names where to free space."""
    return err if err.filename or err.errno is None else type(err)(err.errno, err.strerror, str(path))


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call write(handle) on a temporary file beside path, fsync it, rename it over path, and
    fsync the directory, so that path is always either the old file or the whole new one."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        write(handle)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(payload))


def fsync_directory(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def check_output(path: Path, name: str, directory: bool = False) -> Path:
    """Refuse in one line, before any work, an output that cannot be written where it is named:
    a directory where a file goes (or a file where a directory goes), a file where a parent
    directory would have to be made, or a parent this user cannot write. Returns path."""
    path = Path(path)
    want, other = ("directory", "file") if directory else ("file", "directory")
    if path.exists() and path.is_dir() != directory:
        raise UserInputError(f"{name} {path} is a {other}, not a {want}; choose another {name}")
    # A file is renamed into its directory, so that directory must be writable even if the file exists.
    existing = next(parent for parent in ((path, *path.parents) if directory else path.parents) if parent.exists())
    if not existing.is_dir():
        raise UserInputError(f"{name} {path} cannot be made: {existing} is a file, not a directory; "
                             f"choose another {name}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserInputError(f"{name} {path} cannot be written here ({existing} is not writable); "
                             f"choose a {want} you can write to")
    return path


def write_new_directory(path: Path, files: dict[str, bytes]) -> None:
    """A directory of files that appears whole or not at all: written and fsynced under a
    temporary name beside path, then renamed to it. An existing path is refused, never merged."""
    path = Path(path)
    if path.exists():
        raise UserInputError(f"{path} already exists; choose a new --out directory (nothing was written)")
    check_output(path, "--out", directory=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~current_umask())
        for name, payload in files.items():
            with open(tmp / name, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
        fsync_directory(tmp)
        os.rename(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise naming(err, path) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_directory(path.parent)
