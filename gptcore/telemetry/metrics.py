"""A run's metrics: one JSON object per logged step, evaluation and probe, in metrics.jsonl.

The file is appended to, so a resumed run continues it; `read_metrics` is its one reader
(analysis, benchmarks and tests all go through it). A run killed mid-write, or stopped by a full
disk, can leave its last line cut off: readers leave that line out and say so once, and a
resumed run drops it together with the steps after its checkpoint, which it is about to redo.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gptcore.errors import TrainingFailure, UserInputError
from gptcore.files import atomic_write_bytes

_told = set()  # files whose cut-off last line was already reported


def parse_lines(path: Path) -> tuple[list[dict], bool]:
    """(the records, whether a cut-off last line was left out). A bad line elsewhere is an error."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    records, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                torn = True
                continue
            raise UserInputError(f"{path}:{number} is not valid JSON; was the file edited?") from None
    return records, torn


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl that MetricsLog wrote."""
    records, torn = parse_lines(path)
    if torn and str(path) not in _told:
        _told.add(str(path))
        print(f"gptcore: note: the last line of {path} is cut off (the run was killed or the disk filled "
              "mid-write); it is left out", file=sys.stderr)
    return records


class MetricsLog:
    """metrics.jsonl, one JSON object per line, appended. Resuming at a step first rewrites the file
    to the records up to that step (and a cut-off last line goes), so no step is ever listed twice."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.path, self.enabled = Path(path), enabled
        self.handle = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            records, _ = parse_lines(self.path)
            kept = [r for r in records if r.get("step", 0) <= resume_step]
            if len(kept) < len(records) or not self.path.read_bytes().endswith(b"\n"):
                atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8"))
        self.handle = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()
        except OSError as err:
            raise TrainingFailure(f"could not append to {self.path} ({err.strerror or err}); the last checkpoint "
                                  "is kept: free space, then rerun with resume=auto, which repairs the file") from None

    def close(self) -> None:
        if self.handle:
            try:
                self.handle.close()
            except OSError:
                pass  # a full disk: the write that failed has said so
