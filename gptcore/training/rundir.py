"""A run directory belongs to one training at a time: an exclusive lock while it runs, and the
leftovers of a killed run (its temporary files, the metrics of a run that never checkpointed)
cleared or moved aside before the next one starts.

The lock is `flock` on OUT_DIR/.lock, held for the life of the process: the kernel drops it when
the process dies however it dies (kill -9, a node's power), so a stale lock never blocks a
rerun. flock rather than POSIX record locks (fcntl/lockf), which a process loses when it closes
*any* descriptor of the file. On NFS, Linux implements flock with the server's byte-range locks,
so it holds across nodes (a dead node's lock goes when its lease expires, 90 s by default); on
Lustre it needs the client mount option `flock` (`localflock` only sees one node). Where the file
system has no locks at all, training goes on with a warning that two runs are not kept apart.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from gptcore.errors import UserInputError
from gptcore.files import atomic_write_bytes, check_output

LOCK_NAME = ".lock"
OWNER_NAME = ".lock.owner"  # who holds the lock, written atomically beside it (the lock file's inode must stay)
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """Exclusive use of a run directory by this process; refused in one line while another holds it."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.fd: int | None = None

    def acquire(self) -> None:
        check_output(self.out_dir, "out_dir", directory=True)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserInputError(
                f"{self.out_dir} is in use by another training run ({self.holder()}); wait for it to end "
                "or choose another out_dir") from None
        except OSError as err:
            os.close(fd)
            if err.errno not in NO_LOCKS:
                raise
            print(f"gptcore: warning: the file system of {self.out_dir} has no file locks ({err.strerror}); "
                  "nothing keeps a second run out of this directory", file=sys.stderr, flush=True)
            return
        self.fd = fd
        owner = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        atomic_write_bytes(self.out_dir / OWNER_NAME, (owner + "\n").encode())

    def holder(self) -> str:
        try:
            return (self.out_dir / OWNER_NAME).read_text().strip() or "owner unknown"
        except OSError:
            return "owner unknown"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def claim(lock: RunLock, log) -> UserInputError | None:
    """Take the lock and clear what a killed run left; the refusal, if the directory is busy."""
    try:
        lock.acquire()
    except UserInputError as err:
        return err
    for stale in remove_stale_temp_files(lock.out_dir):
        log(f"removed {stale}, left by a run killed while writing it")
    return None


def remove_stale_temp_files(out_dir: Path) -> list[Path]:
    """Delete the temporary files that atomic writes leave when killed mid-write
    (`.ckpt.pt.<random>.tmp`, each as large as the checkpoint). Only called under the run's lock,
    so no live writer owns them."""
    removed = []
    for folder in (out_dir, out_dir / "data"):
        for path in folder.glob(".*.*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def move_aside(out_dir: Path, names: tuple[str, ...]) -> Path | None:
    """Move an earlier run's files out of the way (into out_dir/earlier-<time>/) rather than
    overwrite or append to them: a directory whose last run never wrote a checkpoint."""
    present = [out_dir / name for name in names if (out_dir / name).exists()]
    if not present:
        return None
    target = out_dir / f"earlier-{time.strftime('%Y%m%d-%H%M%S')}"
    target.mkdir(exist_ok=False)
    for path in present:
        path.rename(target / path.name)
    return target
