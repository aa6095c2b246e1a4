"""A run's metrics: one JSON object per logged step, evaluation and probe, in metrics.jsonl.

The file is appended to, so a resumed run continues it; `read_metrics` is its one reader
(analysis, benchmarks and tests all go through it).
"""

from __future__ import annotations

import json
from pathlib import Path

from gptcore.errors import UserInputError


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl that MetricsLog wrote."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserInputError(f"{path}:{number} is not valid JSON; was the run killed while writing?") from None
    return records


class MetricsLog:
    """metrics.jsonl, one JSON object per line, appended (a resumed run continues the file)."""

    def __init__(self, path: Path, enabled: bool):
        self.enabled = enabled
        self.handle = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, record: dict) -> None:
        if self.enabled:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle:
            self.handle.close()
