"""Where a run's records go: metrics.jsonl always, TensorBoard and Weights & Biases when asked.

The trainer writes each record (the start, a probe, a logged window, an evaluation) to one
RunLog, which hands it to every sink. metrics.jsonl keeps records whole; TensorBoard and W&B get
the numbers of the step-stamped ones as scalars named by `scalars_of`, and with each logged
window the hardware sampler's figures of that window (`hardware_scalars`):

    train/loss  train/lr  perf/ms_per_step  perf/tokens_per_s  perf/mfu  phases/<phase>_ms
    comm/allreduce_ms  comm/exposed_ms  eval/train_loss  eval/val_loss  eval/val_bpc
    system/node_cpu_pct  system/others_cpu_pct  system/node_mem_used_mib
    system/rank<R>_cpu_pct  system/rank<R>_rss_mib  system/gpu<I>_util_pct  system/gpu<I>_mem_mib

A resumed run continues the same curves: TensorBoard drops what an earlier session logged after
the checkpoint (purge_step), W&B continues the same run id, kept in RUN_DIR/wandb_run_id.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
from pathlib import Path

import torch

from gptcore.cluster import distributed
from gptcore.config import Config
from gptcore.errors import GptcoreError, TrainingFailure, UserInputError
from gptcore.files import atomic_write_bytes
from gptcore.telemetry.metrics import MetricsLog, read_metrics
from gptcore.telemetry.sampler import summarize_samples

TENSORBOARD_DIR = "tb"
WANDB_ID_FILE = "wandb_run_id"


def scalars_of(record: dict) -> dict[str, float]:
    """A metrics record's numbers under the names TensorBoard and W&B show; {} for records
    that are not stamped with a step (the start, the all-reduce probe)."""
    if "step" not in record:
        return {}
    if record.get("eval"):
        return {"eval/train_loss": record["train_loss"], "eval/val_loss": record["val_loss"],
                "eval/val_bpc": record["val_bpc"]}
    scalars = {"train/loss": record["loss"], "train/lr": record["lr"], "perf/ms_per_step": record["ms_per_step"],
               "perf/tokens_per_s": record["tokens_per_s"]}
    if "mfu" in record:
        scalars["perf/mfu"] = record["mfu"]
    scalars.update({f"phases/{name}_ms": ms for name, ms in record.get("phases_ms", {}).items()})
    for name in ("allreduce_ms", "exposed_ms"):
        if name in record.get("comm", {}):
            scalars[f"comm/{name}"] = record["comm"][name]
    return scalars


def hardware_scalars(samples: list[dict]) -> dict[str, float]:
    """One window's hardware samples as scalars: medians, and peaks for memory."""
    summary = summarize_samples(samples)
    if not summary:
        return {}
    scalars = {"system/node_cpu_pct": summary["node_cpu_pct"], "system/node_mem_used_mib": summary["node_mem_used_mib"]}
    if "others_cpu_pct" in summary:
        scalars["system/others_cpu_pct"] = summary["others_cpu_pct"]
    for rank, proc in summary["ranks"].items():
        scalars[f"system/rank{rank}_cpu_pct"] = proc["cpu_pct"]
        scalars[f"system/rank{rank}_rss_mib"] = proc["rss_peak_mib"]
    for index, gpu in summary.get("gpus", {}).items():
        scalars[f"system/gpu{index}_util_pct"] = gpu["util_pct"]
        scalars[f"system/gpu{index}_mem_mib"] = gpu["mem_peak_mib"]
    return scalars


class SampleTail:
    """The samples a sampler has appended to its file, handed out window by window: those taken
    up to a time, read as the file grows (a line still being written waits for the next read)."""

    def __init__(self, path: Path, skip_existing: bool):
        self.path, self.pending, self.partial = Path(path), [], b""
        self.offset = self.path.stat().st_size if skip_existing and self.path.is_file() else 0

    def until(self, time: float) -> list[dict]:
        if self.path.is_file():
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
            self.offset += len(chunk)
            *lines, self.partial = (self.partial + chunk).split(b"\n")
            self.pending += [json.loads(line) for line in lines if line.strip()]
        taken = [s for s in self.pending if s["time"] <= time]
        self.pending = [s for s in self.pending if s["time"] > time]
        return taken


class TensorBoardSink:
    def __init__(self, log_dir: Path, purge_after: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # Events of an earlier session past the checkpoint this one resumed from are redone:
        # TensorBoard drops the old ones from purge_step on.
        self.writer = SummaryWriter(str(log_dir), purge_step=None if purge_after is None else purge_after + 1,
                                    flush_secs=10)

    def scalars(self, step: int, scalars: dict[str, float], walltime: float | None) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step, walltime=walltime)

    def text(self, step: int, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per run directory, continued by every session of it (a requeued job too)."""

    def __init__(self, config: Config, out_dir: Path):
        import wandb

        id_file = out_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        if not run_id.isalnum() or len(run_id) > 64:
            raise UserInputError(f"{id_file} holds no W&B run id; delete it to start a new W&B run")
        atomic_write_bytes(id_file, run_id.encode())
        name = config.log.run_name or out_dir.name
        job = os.environ.get("SLURM_JOB_ID")
        if job and job not in name:
            name = f"{name}-{job}"
        try:
            self.run = wandb.init(project=config.log.wandb_project, name=name, id=run_id, resume="allow",
                                  dir=str(out_dir), mode=config.log.wandb, config=config.to_dict())
        except Exception as err:  # wandb raises its own errors for a missing login or no network
            raise TrainingFailure(f"W&B could not start a {config.log.wandb} run ({str(err).splitlines()[0][:160]}); "
                                  "run `wandb login` or set WANDB_API_KEY, or use log.wandb=offline and "
                                  "`wandb sync` later") from None

    def scalars(self, step: int, scalars: dict[str, float], walltime: float | None) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def tensorboard_wanted(config: Config) -> bool:
    """log.tensorboard: auto is on where the tensorboard package is installed."""
    installed = importlib.util.find_spec("tensorboard") is not None
    if config.log.tensorboard == "true" and not installed:
        raise UserInputError("log.tensorboard=true needs the tensorboard package: pip install tensorboard "
                             "(env/setup.sh installs it), or log.tensorboard=false")
    return config.log.tensorboard == "true" or (config.log.tensorboard == "auto" and installed)


def check_sinks(config: Config) -> None:
    """What a sink needs, found on every rank before any starts."""
    tensorboard_wanted(config)
    if config.log.wandb != "off" and importlib.util.find_spec("wandb") is None:
        raise UserInputError(f"log.wandb={config.log.wandb} needs the wandb package: pip install wandb, "
                             "or log.wandb=off")


class RunLog:
    """metrics.jsonl and the scalar sinks beside it, as one: write(record) and close(). Each
    logged window's record goes to the scalar sinks with the hardware samples of that window."""

    def __init__(self, metrics: MetricsLog | None, sinks: list, samples: SampleTail):
        self.metrics, self.sinks, self.samples = metrics, sinks, samples

    def write(self, record: dict) -> None:
        if self.metrics:
            self.metrics.write(record)
        scalars = scalars_of(record)
        if not self.sinks or not scalars:
            return
        if "train/loss" in scalars:
            scalars.update(hardware_scalars(self.samples.until(record["time"])))
        for sink in self.sinks:
            sink.scalars(record["step"], scalars, record.get("time"))

    def close(self) -> None:
        for sink in [self.metrics, *self.sinks]:
            if sink:
                sink.close()


def open_run_log(config: Config, out_dir: Path, is_main: bool, resume_step: int | None,
                 device: torch.device) -> RunLog:
    """Collective: rank 0 opens metrics.jsonl and the sinks asked for; if any fails to open, every
    rank stops with it, rather than the others waiting for rank 0 at the first log step."""
    sinks, failure = [], None
    if is_main:
        try:
            if tensorboard_wanted(config):
                sinks.append(TensorBoardSink(out_dir / TENSORBOARD_DIR, resume_step))
                print(f"tensorboard: {out_dir / TENSORBOARD_DIR} (watch: tensorboard --logdir {out_dir.parent})", flush=True)
            if config.log.wandb != "off":
                sinks.append(WandbSink(config, out_dir))
        except GptcoreError as err:
            failure = err
    run_log = RunLog(MetricsLog(out_dir / "metrics.jsonl", is_main, resume_step), sinks,
                     SampleTail(out_dir / "samples" / "node0.jsonl", skip_existing=True))
    if distributed.any_rank(failure is not None, device):
        run_log.close()
        raise failure or TrainingFailure("rank 0 could not open the run's logs (its output says why)")
    return run_log


def replay(run_dir: Path, log_dir: Path) -> None:
    """A finished run's metrics.jsonl (and node 0's samples) as TensorBoard events in log_dir."""
    run_log = RunLog(None, [TensorBoardSink(log_dir, None)],
                     SampleTail(run_dir / "samples" / "node0.jsonl", skip_existing=False))
    for record in read_metrics(run_dir / "metrics.jsonl"):
        run_log.write(record)
    run_log.close()


def add_sample_text(config: Config, out_dir: Path, step: int, text: str) -> None:
    """The sample generated after training, as text in the run's TensorBoard log."""
    if tensorboard_wanted(config):
        sink = TensorBoardSink(out_dir / TENSORBOARD_DIR, None)
        sink.text(step, "sample", f"```\n{text}\n```")  # a code block keeps the sample's line breaks
        sink.close()
