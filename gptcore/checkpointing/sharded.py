"""Sharded checkpoints (train.parallel=fsdp): every rank writes its own shards with
torch.distributed.checkpoint (DCP), and a run resumes on any number of ranks.

    RUN_DIR/ckpt-00000500/    .metadata, __<rank>_0.distcp (each rank's shards), run.pt

A checkpoint is written under a temporary name (`.ckpt-00000500.tmp`) and renamed once every
rank's shards, DCP's metadata and run.pt (the step, config, vocabulary, data and random
generators, as in a single-file checkpoint) are on disk; only then is the older one removed.
A directory without its final name is never read: a rank killed mid-write leaves the previous
checkpoint in place. On load, DCP reads whatever parts of the saved shards this rank's shards
cover, so 2 ranks' checkpoint resumes on 1 or 4.

DCP's metadata is a pickle; gptcore/checkpointing/dcp_io.py reads it with an unpickler that builds DCP's own
record types and nothing else, so a checkpoint cannot run code (the shards themselves load with
weights_only). This module finds checkpoints and describes runs without importing DCP.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from gptcore.checkpointing import checkpoint
from gptcore.cluster import distributed
from gptcore.config import Config, config_from_dict
from gptcore.errors import TrainingFailure, UserInputError
from gptcore.files import fsync_directory
from gptcore.models.gpt import GPT
from gptcore.models.optim import make_optimizer

FORMAT = "gptcore-sharded-checkpoint"
RUN_FILE = "run.pt"
NAME = re.compile(r"ckpt-(\d{8})")
READ_ATTEMPTS = 5  # reads of a run's newest checkpoint while a training keeps replacing it


def directory_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def newest(run_dir: Path) -> Path | None:
    """The newest complete sharded checkpoint in a run directory (temporary ones never match)."""
    found = [p for p in Path(run_dir).glob("ckpt-*") if NAME.fullmatch(p.name) and p.is_dir()]
    return max(found, key=lambda p: p.name) if found else None


def checkpoint_directory(path: Path) -> Path | None:
    """The sharded checkpoint a path names: the checkpoint's own directory, or its run's newest."""
    path = Path(path)
    if not path.is_dir():
        return None
    return path if (path / RUN_FILE).is_file() else newest(path)


def is_sharded(path: Path) -> bool:
    return checkpoint_directory(path) is not None


def read_run(directory: Path) -> dict:
    return checkpoint.load(Path(directory) / RUN_FILE, FORMAT)


def consolidate(path: Path) -> dict:
    """A sharded checkpoint (its directory, or the run directory that holds it) as the state of a
    single-file checkpoint, optimizer included, in this one process: `gptcore export` writes it,
    sample / eval / quantize read it. A training that writes a newer checkpoint meanwhile removes
    the one being read; given the run directory, the newest is then read instead."""
    for attempt in range(READ_ATTEMPTS):
        directory = checkpoint_directory(path)
        if directory is None and attempt:
            raise UserInputError(f"{path} was removed while it was read: a training replaced it with a newer "
                                 "checkpoint; pass the run directory to read its newest")
        if directory is None:
            raise UserInputError(f"{path} holds no sharded checkpoint (ckpt-NNNNNNNN/); pass a run directory of a "
                                 "train.parallel=fsdp run")
        files = files_in(directory)
        try:
            return read_sharded(directory)
        except (UserInputError, OSError) as err:
            # A training removes an older checkpoint file by file once a newer one has its name.
            replaced = files_in(directory) != files or (directory != Path(path) and newest(path) != directory)
            if not replaced:  # the checkpoint itself is at fault
                if isinstance(err, OSError):
                    raise UserInputError(f"checkpoint {directory} cannot be read ({checkpoint.one_line(err, 160)})") \
                        from None
                raise
    raise UserInputError(f"the newest checkpoint in {path} was replaced {READ_ATTEMPTS} times while it was read; "
                         "read it once the training has stopped, or copy a checkpoint elsewhere first")


def files_in(directory: Path) -> set[str]:
    try:
        return {entry.name for entry in os.scandir(directory)}
    except OSError:
        return set()


def read_sharded(directory: Path) -> dict:
    run = read_run(directory)
    config = config_from_dict(run["config"], f"the config in {directory}")
    # A header may not describe a model larger than its shards (refused before anything is built).
    shards = sum(part.stat().st_size for part in directory.glob("*.distcp"))
    checkpoint.check_header_fits_file(config, "fp32", shards, directory)
    from gptcore.checkpointing.dcp_io import READ_ERRORS, load_shards

    try:
        model = GPT(config.model, init_weights=False)
        optimizer = make_optimizer(model, config)
        with warnings.catch_warnings():  # DCP warns that one process reads without a process group: it is meant to
            warnings.simplefilter("ignore", UserWarning)
            load_shards(directory, model, optimizer, no_dist=True)
    except UserInputError:
        raise
    except READ_ERRORS as err:  # DCP raises its own exception types for missing or mismatched shards
        raise UserInputError(f"checkpoint {directory} is damaged or incomplete ({str(err).splitlines()[0][:160]}); "
                             "use another checkpoint or retrain") from None
    return {**run, "format": checkpoint.FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


class ShardedCheckpointer:
    """The sharded counterpart of checkpoint.Checkpointer, with the same calls. save() is
    collective and synchronous: each rank writes only its own 1/N of the state."""

    def __init__(self, run_dir: Path, device: torch.device, rank: int):
        self.run_dir = Path(run_dir)
        self.device, self.rank = device, rank
        self.saved_step: int | None = None
        self.path = newest(self.run_dir) or self.run_dir / directory_name(0)

    def existing(self, config: Config) -> dict | None:
        single = self.run_dir / "ckpt.pt"
        if single.exists():
            raise UserInputError(f"{single} is a train.parallel=ddp checkpoint; resume it with train.parallel=ddp, "
                                 "or train with fsdp into another out_dir")
        if (directory := newest(self.run_dir)) is None:
            return None
        if config.resume != "auto":
            raise UserInputError(f"{directory} already exists; pass resume=auto to continue that run or choose "
                                 "another out_dir")
        self.path = directory
        return checkpoint.check_resumable(read_run(directory), config, directory)

    def kept(self) -> str:
        return "no checkpoint was written" if self.saved_step is None else f"{self.path} (step {self.saved_step}) is kept"

    def restore(self, state: dict, model: torch.nn.Module, optimizer, data) -> tuple[int, float]:
        from gptcore.checkpointing.dcp_io import READ_ERRORS, load_shards

        try:
            step, best = int(state["step"]), float(state["best_val_loss"])
            load_shards(self.path, model, optimizer)
            data.load_state_dict(state["data"])
            checkpoint.restore_rng_state(state["rng"], self.rank, self.device)
        except UserInputError:
            raise
        except READ_ERRORS as err:  # DCP raises CheckpointException for missing or mismatched shards
            raise UserInputError(f"checkpoint {self.path} is damaged or from another version "
                                 f"({str(err).splitlines()[0][:160]}); use another checkpoint or retrain") from None
        self.saved_step = step
        return step, best

    def save(self, step: int, model: torch.nn.Module, optimizer, data, **run: object) -> None:
        """Collective: every rank writes its shards into the temporary directory that rank 0 made;
        rank 0 adds run.pt and gives the directory its name."""
        rng = checkpoint.gather_rng_states(self.device)
        final = self.run_dir / directory_name(step)
        if final.is_dir():  # resumed at this step and stopped again: that checkpoint is this state
            self.path, self.saved_step = final, step
            return
        partial = self.run_dir / f".{final.name}.tmp"
        if self.rank == 0:
            for stale in self.run_dir.glob(".ckpt-*.tmp"):  # left by a run killed mid-write
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir(parents=True)
        distributed.barrier()
        from gptcore.checkpointing.dcp_io import WRITE_ERRORS, save_shards

        try:
            save_shards(partial, model, optimizer)
            if self.rank == 0:
                checkpoint.save({"format": FORMAT, "version": checkpoint.FORMAT_VERSION, "step": step,
                                 "data": data.state_dict(), "rng": rng, **run}, partial / RUN_FILE)
                partial.rename(final)
                fsync_directory(self.run_dir)
                for older in self.run_dir.glob("ckpt-*"):
                    if NAME.fullmatch(older.name) and older.name < final.name:
                        shutil.rmtree(older)
        except WRITE_ERRORS as err:
            raise self._failure(err, final) from None
        self.path, self.saved_step = final, step

    def _failure(self, err: Exception, final: Path) -> TrainingFailure:
        causes = list(getattr(err, "failures", {}).values()) or [err]
        cause = next((c for c in causes if isinstance(c, OSError)), causes[0])
        kept = (f"the previous checkpoint {self.path} (step {self.saved_step}) is kept" if self.saved_step is not None
                else "no earlier checkpoint was changed")
        if isinstance(cause, OSError):
            return checkpoint.write_failure(final, cause, kept)
        return TrainingFailure(f"could not write {final} ({str(cause).splitlines()[0][:160]}); {kept}")

    def wait(self) -> None:
        """Nothing is in flight: save() returns once its checkpoint is on disk."""


def checkpointer_for(config: Config, run_dir: Path, device: torch.device, rank: int):
    """The run's checkpoint component: sharded under fsdp, one file (written in the background) under ddp."""
    if config.train.parallel == "fsdp":
        return ShardedCheckpointer(run_dir, device, rank)
    single = checkpoint.Checkpointer(Path(run_dir) / "ckpt.pt", device, rank, config.train.ckpt_background)
    if (directory := newest(run_dir)) is not None and not single.path.exists():
        raise UserInputError(f"{directory} is a sharded (train.parallel=fsdp) checkpoint; resume it with "
                             f"train.parallel=fsdp, or make it one file: gptcore export --ckpt {run_dir} --out FILE")
    return single


def size_on_disk(path: Path) -> int:
    """Bytes of a checkpoint file, or of a sharded checkpoint's files."""
    directory = checkpoint_directory(path)
    if directory is None:
        return Path(path).stat().st_size
    return sum(part.stat().st_size for part in directory.iterdir() if part.is_file())


def open_checkpoint(path: Path) -> dict:
    """A single-file checkpoint's state, or a sharded one's consolidated."""
    return consolidate(path) if is_sharded(path) else checkpoint.load(path)
