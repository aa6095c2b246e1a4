"""What every benchmark shares: the checkout on sys.path, so that `python bench/NAME.py` imports
this gptcore (not an installed copy) from any directory, and one definition of steady state:
the scaling report's (analysis.scaling: the first logged window and the first 10% of the steps
are warm-up), so a benchmark's ms/step and a report's mean the same thing."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from analysis.scaling import steady_records  # noqa: E402  (after the sys.path fix)


def steady_median(records: list[dict], key: str = "ms_per_step", warmup_fraction: float = 0.1) -> float:
    """Median of `key` over a run's step records after warm-up."""
    values = [r[key] for r in steady_records(records, warmup_fraction) if key in r]
    if not values:
        raise ValueError(f"no steady step records with {key!r}; train for more logged windows")
    return statistics.median(values)


def wait_for_quiet(max_load: float, timeout_s: float) -> float:
    """The 1-minute load average once it is below max_load (or when timeout_s has passed)."""
    deadline = time.monotonic() + timeout_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


class OthersCpu:
    """CPU that other processes took while a block ran, in % of one core: the load a shared
    machine put beside the measurement, reported with it (or a round run again)."""

    def __enter__(self):
        self.me = psutil.Process()
        psutil.cpu_percent(None)
        self.me.cpu_percent(None)
        return self

    def __exit__(self, *exc):
        self.pct = max(0.0, psutil.cpu_percent(None) * psutil.cpu_count() - self.me.cpu_percent(None))


def spread(values: list[float]) -> str:
    """median (min-max), as BENCHMARKS.md writes figures."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"
