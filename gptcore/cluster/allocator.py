"""glibc malloc's thresholds for a training process.

A CPU training step allocates and frees the same activation and gradient buffers at every step.
glibc serves a block above its mmap threshold with a fresh mmap and unmaps it when it is freed,
and hands free memory at the top of its heap back to the kernel above its trim threshold. Both
start at 128 KiB and only follow the sizes freed so far (the trim threshold at twice the mmap one),
so a step's buffers can go back to the kernel at its end and be faulted in, zeroed, again at the
next step. Fixing the mmap threshold at glibc's maximum and the trim threshold far above it keeps
them in the heap, reused from step to step: what PyTorch's CPU tuning guide gets from jemalloc or
tcmalloc, with the C library already loaded (BENCHMARKS.md). A user's own setting is kept. (With
another allocator preloaded, glibc's malloc serves little, and setting its thresholds changes
little.)
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1024 * 1024 * 1024

# How a user sets them at start-up: glibc's tunables, or its older variables.
USER_SETTINGS = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def user_set(environ=os.environ) -> bool:
    """Whether the user chose either threshold."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(name in tunables for name in USER_SETTINGS) or any(name in environ for name in USER_VARIABLES)


def keep_buffers_in_heap(environ=os.environ) -> bool:
    """Sets both thresholds through mallopt in this process. False where nothing was set: not glibc,
    or the user chose (user_set)."""
    if user_set(environ):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc's own symbol: musl and macOS have a mallopt of their own, or none
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
