"""What a launch script does first, so that `python launch/NAME.py` works with any Python: put the
checkout on sys.path, and when this Python lacks gptcore's dependencies (the system python3 of a
login node), run the same command again under the checkout's environment: $GPTCORE_VENV, else
.venv beside it. Nothing heavy is imported here, so `--help` and `--dry-run` stay instant."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("yaml", "psutil", "submitit", "torch")


def ensure_environment(needed: tuple[str, ...] = NEEDED) -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if not missing:
        return
    venv = Path(os.environ.get("GPTCORE_VENV") or REPO / ".venv")
    python = venv / "bin" / "python"
    script = Path(sys.argv[0]).name
    if python.is_file() and os.environ.get("GPTCORE_REEXEC") != str(python):
        os.environ["GPTCORE_REEXEC"] = str(python)  # once: a broken environment must not loop
        os.execv(python, [str(python), *sys.argv])
    sys.exit(f"{script}: error: {sys.executable} has no {', '.join(missing)} and there is no environment at {venv}; "
             f"run `bash env/setup.sh` in {REPO} first (or set GPTCORE_VENV)")
