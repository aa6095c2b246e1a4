"""`python -m MODULE ARGS` without paying for `import torch` each time: one interpreter per test
worker imports torch and gptcore once, then forks a child for each command. The child is a real
process of its own (its pid, exit status, signals, files, threads, interpreter shutdown), set up as
`python -m` would set it up: its working directory first on sys.path, its own environment, argv,
stdin from /dev/null and its output into files that the caller reads.

Only what a process reads when torch is imported cannot differ from a fresh one; a command whose
environment changes such a setting (warm_enough) runs as a plain subprocess instead."""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

# Read by torch, OpenMP or Python themselves at start-up or import (CXX: by inductor's config): a
# change needs a fresh process.
STARTUP_PREFIXES = ("TORCH", "OMP_", "GOMP_", "KMP_", "MKL_", "CUDA", "PYTHON", "LD_", "NCCL", "GLOO", "CXX")
# What the commands import, once, in the starter. torch._dynamo too: a training imports it with its
# first optimizer (torch.optim wraps add_param_group in torch._disable_dynamo), 1.6 s a command.
PRELOAD = ("torch", "torch._dynamo", "gptcore.cli", "gptcore.inference.generate", "gptcore.inference.quantize",
           "gptcore.training.train")


def warm_enough(env: dict, base: dict) -> bool:
    """True where ENV differs from BASE (the starter's) in nothing read at start-up."""
    changed = {key for key in env.keys() | base.keys() if env.get(key) != base.get(key)}
    return not any(key.startswith(STARTUP_PREFIXES) for key in changed)


class WarmStarter:
    """The test side: starts the starter (this file run as a script) in CWD with ENV, and runs
    commands through it, one at a time (`lock`: a caller that cannot take it runs a subprocess)."""

    def __init__(self, cwd: Path, env: dict):
        self.env = env
        self.lock = threading.Lock()
        self.process = subprocess.Popen([sys.executable, __file__, *PRELOAD], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.unread = b""  # what the starter wrote beyond the last line read
        self.reply(600)

    def reply(self, timeout: float) -> dict:
        """The starter's next line. Read from the descriptor itself: a buffered reader may take two
        lines at once (the pid, then a quick command's status), and select() would not see the second."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.unread:
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError
            chunk = os.read(self.process.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError(f"the warm starter ended (status {self.process.wait()})")
            self.unread += chunk
        line, self.unread = self.unread.split(b"\n", 1)
        return json.loads(line)

    def run(self, module: str, args: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
        """Like subprocess.run([python, -m, MODULE, *ARGS], capture_output=True, text=True)."""
        command = [sys.executable, "-m", module, *args]
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            request = {"module": module, "args": args, "cwd": str(cwd), "env": env, "stdout": str(out),
                       "stderr": str(err)}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = self.reply(30)["pid"]
            try:
                code = self.reply(timeout)["code"]
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self.reply(30)
                raise subprocess.TimeoutExpired(command, timeout, out.read_text(), err.read_text()) from None
            return subprocess.CompletedProcess(command, code, out.read_text(), err.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def become(request: dict) -> int:
    """In the child: `python -m MODULE ARGS` as the request sets it up, run; its exit status."""
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = request["cwd"]
    sys.argv = ["-m", *request["args"]]
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        return 1


def serve() -> None:
    """The starter: imports the modules named by its arguments, then forks one child per request
    line on stdin."""
    sys.path[0] = os.getcwd()  # as `python -m` from here would have it
    for module in sys.argv[1:]:
        importlib.import_module(module)
    gc.freeze()  # children share these pages instead of copying them as their collector visits them
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            code = become(json.loads(line))
            # An interpreter's shutdown, less the teardown of torch's modules (half a second that
            # no command relies on): wait for its threads, run its exit handlers, flush.
            threading._shutdown()
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            if code < 0:
                signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            os._exit(code & 0xFF)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    serve()
