"""Reading a run directory: config.yaml, metrics.jsonl (steps, evals, all-reduce probes, the
start record of threads and dtype), samples/node*.jsonl, profile/rank*.prof."""

from __future__ import annotations

import pstats
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from analysis.scaling import step_records
from gptcore.config import Config, config_from_dict
from gptcore.errors import UserInputError
from gptcore.telemetry.metrics import read_metrics
from gptcore.telemetry.sampler import read_samples


@dataclass
class Run:
    path: Path
    config: Config
    world_size: int
    steps: list[dict]  # step records, in order
    evals: list[dict]
    samples: dict[str, list[dict]] = field(default_factory=dict)  # node file stem -> samples
    profiles: list[Path] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)  # all-reduce probes, one per (re)start of a multi-rank run
    start: dict | None = None  # rank 0's start record: threads, usable_cpus, node_cpus, sharing_ranks, dtype

    @property
    def nodes(self) -> int:
        """Distinct hosts the ranks ran on, as the all-reduce probe counted them."""
        return self.probes[-1]["nodes"] if self.probes else 1


def load_run(path: str | Path) -> Run:
    path = Path(path)
    metrics, config_file = path / "metrics.jsonl", path / "config.yaml"
    for needed in (config_file, metrics):
        if not needed.is_file():
            raise UserInputError(f"{path} is not a finished training run: {needed.name} is missing")
    config = config_from_dict(yaml.safe_load(config_file.read_text(encoding="utf-8")) or {})
    records = read_metrics(metrics)
    steps = step_records(records)
    if not steps:
        raise UserInputError(f"{metrics} has no step records; train for more than train.log_interval steps")
    samples = {p.stem: read_samples(p) for p in sorted((path / "samples").glob("node*.jsonl"))}
    return Run(path=path, config=config, world_size=int(steps[-1]["world_size"]), steps=steps,
               evals=[r for r in records if r.get("eval")], samples=samples,
               profiles=sorted((path / "profile").glob("rank*.prof"), key=lambda p: int(p.stem[4:])),
               probes=[r for r in records if r.get("probe") == "allreduce"],
               start=next((r for r in reversed(records) if "threads" in r and "step" not in r), None))


def top_functions(stats: pstats.Stats, limit: int = 25, sort: str = "cumulative") -> list[dict]:
    """The `limit` heaviest functions of a (merged) pstats profile, as plain records."""
    column = {"cumulative": 3, "tottime": 2}[sort]
    rows = sorted(stats.stats.items(), key=lambda item: item[1][column], reverse=True)[:limit]
    return [{"function": name, "file": file, "line": line, "calls": primitive, "tottime_s": tottime,
             "cumtime_s": cumtime}
            for (file, line, name), (primitive, _, tottime, cumtime, _) in rows]


def merged_profile(paths: list[Path]) -> pstats.Stats | None:
    """Every rank's cProfile added together: times are summed over ranks."""
    return pstats.Stats(*map(str, paths)) if paths else None


def gradient_bytes(config: Config) -> int:
    """Bytes DDP all-reduces per step: one fp32 gradient per parameter (autocast keeps the
    parameters, hence the gradients, in fp32). The model is built on the meta device: no memory."""
    import torch

    from gptcore.models.gpt import GPT

    with torch.device("meta"):
        model = GPT(config.model)
    return 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
