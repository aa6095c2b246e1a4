"""The shell commands that README.md and docs/ show, as test_docs.py and test_docs_session.py read them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# In the order a reader follows them: the README, then the guides it links.
DOCS = [REPO / "README.md", *(REPO / "docs" / name for name in
                              ("training.md", "export.md", "gpus.md", "scaling.md", "slurm.md", "reliability.md"))]


def shell_commands(path: Path) -> list[str]:
    """The commands of a file's ```bash blocks: continuation lines joined, split at ; and &&."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"^\w+=\$\((.*)\)$", r"\1", line.strip())  # JOB=$(sbatch ...)
            commands += [part.strip() for part in re.split(r";|&&", line) if part.strip()]
    return commands


def split(command: str) -> tuple[dict[str, str], list[str]]:
    """(the VAR=value settings in front, the words after them), comments dropped, `.venv/bin/` dropped."""
    words = shlex.split(command, comments=True)
    env = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):  # CONFIG=tiny EXTRA="..." sbatch ...
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, [word.removeprefix(".venv/bin/") for word in words]


def normalized(command: str) -> str:
    """A command as a shell would see it: no comment, single spaces, no `.venv/bin/`."""
    env, words = split(command)
    return " ".join([*(f"{key}={shlex.quote(value)}" for key, value in env.items()), *map(shlex.quote, words)])


def every_command() -> list[str]:
    """Each command of the docs once (normalized), in reading order: the README's quick start is
    repeated in the guides."""
    return list(dict.fromkeys(normalized(command) for path in DOCS for command in shell_commands(path)))
