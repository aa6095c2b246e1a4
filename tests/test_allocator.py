"""glibc malloc's thresholds for a training (cluster.allocator): a step's buffers stay in the heap
instead of going back to the kernel and being faulted in again at the next step."""

import os
import subprocess
import sys

import pytest

from conftest import REPO
from gptcore.cluster.allocator import keep_buffers_in_heap, user_set

# Six "steps", each writing four 8 MiB buffers and freeing them together; prints each step's page faults.
STEPS = """
import ctypes, resource, sys
from gptcore.cluster.allocator import keep_buffers_in_heap
print(keep_buffers_in_heap() if sys.argv[1] == "kept" else None)
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 8 << 20
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(size) for _ in range(4)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in blocks:
        libc.free(block)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def step_faults(mode: str, env: dict) -> tuple[str, list[int]]:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], [int(n) for n in out[1:]]


GLIBC = "CS_GNU_LIBC_VERSION" in os.confstr_names and bool(os.confstr("CS_GNU_LIBC_VERSION"))


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc")
def test_a_steps_buffers_are_faulted_in_once_not_at_every_step():
    env = {key: value for key, value in os.environ.items()
           if key != "GLIBC_TUNABLES" and not key.startswith("MALLOC_")}
    _, default = step_faults("default", env)
    pages = 4 * (8 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert min(default[2:]) > pages // 2  # glibc alone gives the buffers back at every step
    kept, faults = step_faults("kept", env)
    assert kept == "True" and faults[0] > pages // 2 and max(faults[1:]) < pages // 50
    chosen, _ = step_faults("kept", {**env, "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"})
    assert chosen == "False"  # the user's choice is kept


def test_only_the_users_own_thresholds_keep_ours_off():
    assert not user_set({"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "MALLOC_ARENA_MAX": "2", "LD_PRELOAD": "x.so"})
    assert user_set({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})
    assert user_set({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert keep_buffers_in_heap({"MALLOC_MMAP_THRESHOLD_": "4096"}) is False
