"""Every shell command in README.md and docs/ still fits the code: the script or template it names
exists, every --flag it passes is one its program takes, and every key=value override is a
config key with a valid value. (What the commands do is run by the other tests; this one catches
a command that a rename or a removed flag left behind in the text.)"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from conftest import REPO
from gptcore.cli import build_parser
from gptcore.config import load_config

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Programs that are not ours: the docs show them being used, nothing here can check their flags.
OTHERS = {"tensorboard", "ssh", "wandb", "llama-completion", "squeue", "ollama", "cd", "eval", "source"}
OVERRIDE = re.compile(r"^(?:[a-z_]+\.)?[a-z_]+=")


def shell_commands(path: Path) -> list[str]:
    """The commands of a file's ```bash blocks: continuation lines joined, split at ; and &&."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"^\w+=\$\((.*)\)$", r"\1", line.strip())  # JOB=$(sbatch ...)
            commands += [part.strip() for part in re.split(r";|&&", line) if part.strip()]
    return commands


@cache
def help_text(*program: str) -> str:
    if program[0] == "gptcore":
        parser = build_parser()
        return parser.format_help() if len(program) == 1 else \
            parser._subparsers._group_actions[0].choices[program[1]].format_help()
    return subprocess.run([sys.executable, *program, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=True).stdout


def check(command: str) -> None:
    words = shlex.split(command, comments=True)
    env = {}
    while words and re.match(r"^[A-Z_]+=", words[0]):  # CONFIG=tiny EXTRA="..." sbatch ...
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    if not words or words[0] in OTHERS:
        return
    words = [word.removeprefix(".venv/bin/") for word in words]
    config, overrides = env.get("CONFIG"), shlex.split(env.get("EXTRA", ""))
    if words[0] in ("sbatch", "bash"):
        script = next(word for word in words[1:] if word.endswith((".sbatch", ".sh")))
        assert (REPO / script).is_file(), f"{command}: no {script}"
        if words[0] == "sbatch":
            overrides += [word for word in words[words.index(script) + 1:]]
        words = []
    elif words[0] == "torchrun":
        words = ["gptcore", *words[words.index("gptcore") + 1:]]
    elif words[:3] == ["python", "-m", "gptcore"]:
        words = ["gptcore", *words[3:]]
    if words and words[0] == "gptcore":
        program, args = ("gptcore", words[1]), words[2:]
        build_parser().parse_args([words[1], *[w for w in args if not OVERRIDE.match(w)]])
    elif words and words[0] == "python":
        program = tuple(words[1:3]) if words[1] == "-m" else (words[1],)
        args = words[1 + len(program):]
        assert (REPO / program[-1]).is_file() or program[0] == "-m", f"{command}: no {program[-1]}"
    else:
        args, program = [], None
    if program:
        flags = {word.split("=")[0] for word in args if word.startswith("--")}
        missing = [flag for flag in flags if flag not in help_text(*program)]
        assert not missing, f"{command}: {' '.join(program)} takes no {', '.join(missing)}"
        if "--config" in args:
            config = args[args.index("--config") + 1]
        overrides += [word for word in args if OVERRIDE.match(word)]
    if overrides:
        load_config(config, overrides)


@pytest.mark.parametrize("path", DOCS, ids=[path.name for path in DOCS])
def test_every_command_in_the_docs_fits_the_code(path):
    commands = shell_commands(path)
    assert commands or path.name in ("reliability.md",), f"{path} shows no command"
    for command in commands:
        check(command)


def test_the_readme_is_a_doorway_and_links_every_doc():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    for doc in DOCS[1:]:
        assert f"(docs/{doc.name})" in readme, f"README.md does not link docs/{doc.name}"
