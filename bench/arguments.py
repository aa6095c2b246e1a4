"""The benchmarks' command lines: argparse types that check every value before any run, and one
way to refuse one (a line naming the script, exit 2, as gptcore's own commands do)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from harness import REPO  # noqa: F401  (puts the checkout on sys.path)

from gptcore.cli import at_least, non_negative_number, positive_number, thread_count  # noqa: E402,F401  (types)
from gptcore.errors import UserInputError  # noqa: E402
from gptcore.files import check_output  # noqa: E402


def output_path(path: str | None, flag: str, directory: bool = False) -> Path | None:
    """Where a benchmark writes, refused in one line before its runs start rather than after them."""
    if path is None:
        return None
    try:
        return check_output(Path(path), flag, directory)
    except UserInputError as err:
        refuse(str(err))


def refuse(message: str) -> NoReturn:
    """Bad input to a benchmark: one line that names the script, and exit 2, as argparse and gptcore do."""
    print(f"{Path(sys.argv[0]).stem}: {message}", file=sys.stderr)
    sys.exit(2)


class BenchParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line naming the script, exit 2, as gptcore's are."""

    def error(self, message):
        refuse(message if message.endswith("--help)") else f"{message} (see --help)")


def probability(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    value = non_negative_number(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be at most 1, got {text}")
    return value


def listed(item):
    """An argparse type: a comma-separated list, each part parsed by `item` (another type)."""
    def parse(text: str) -> list:
        return [item(part) for part in text.split(",")]
    return parse


def one_of(*names: str):
    """An argparse type, for listed(): one of NAMES."""
    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"unknown {text!r}; choose from {', '.join(names)}")
        return text
    return parse


def known_config(text: str, overrides: list[str] | None = None) -> str:
    """An argparse type: a config preset or YAML file that loads (with OVERRIDES, KEY=VALUE each)."""
    from gptcore.config import load_config

    try:
        load_config(text, overrides or [])
    except UserInputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def data_source(text: str) -> str:
    """An argparse type: what data.path takes, a corpus name or a text file or directory."""
    from gptcore.data.corpus import CORPORA

    if text not in CORPORA and not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text} is neither a corpus ({', '.join(CORPORA)}) nor a file or directory")
    return text


def existing_file(text: str) -> str:
    """An argparse type: a file that is there."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return text


def checkout(files: tuple[str, ...], hint: str):
    """An argparse type: a directory holding FILES (a checkout of another project; HINT says which)."""
    def parse(text: str) -> Path:
        if missing := [name for name in files if not (Path(text) / name).is_file()]:
            raise argparse.ArgumentTypeError(f"{text} has no {', '.join(missing)}; pass {hint}")
        return Path(text)
    return parse


def is_program(path: str) -> bool:
    return Path(path).is_file() and os.access(path, os.X_OK)


def program(text: str) -> str:
    """An argparse type: an executable file."""
    if not is_program(text):
        raise argparse.ArgumentTypeError(f"{text} is not an executable file")
    return text
