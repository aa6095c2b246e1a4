"""train.parallel=fsdp with real ranks (torchrun, gloo on the CPU): the same loss curve as DDP and
as one rank, sharded checkpoints that resume bit-identically and on another number of ranks,
never a half-written one, and one file for sample / eval / quantize from `gptcore export`."""

import dataclasses
import io
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path, PosixPath

import psutil
import pytest
import torch

from conftest import REPO, assert_one_line_error, run_gptcore, run_metrics
from gptcore.checkpointing.dcp_io import MetadataUnpickler
from gptcore.checkpointing.sharded import newest

# 20 steps of 2 micro-batches each, a loss logged at every step; no dropout, so that runs on
# different numbers of ranks draw the same numbers.
TINY = ["--config", "tiny", "train.device=cpu", "train.log_interval=1", "train.sample_tokens=0", "train.grad_accum=2"]


def command(ranks: int, *overrides: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return [*launcher, "-m", "gptcore", "train", *TINY, *overrides]


def train(ranks: int, *overrides: str) -> str:
    result = subprocess.run(command(ranks, *overrides), cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def losses(run_dir) -> list[float]:
    return [record["loss"] for record in run_metrics(run_dir) if "loss" in record]


def memory(run_dir) -> dict:
    return next(record["memory"] for record in run_metrics(run_dir) if "memory" in record)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """One rank, two DDP ranks, and two FSDP ranks (ZeRO-3, and ZeRO-2 with activation
    checkpointing), all on the same global batch."""
    root = tmp_path_factory.mktemp("fsdp")
    data = f"data.path={corpus}"
    logs = {
        "one": train(1, data, f"out_dir={root / 'one'}"),
        "ddp": train(2, data, f"out_dir={root / 'ddp'}"),
        "fsdp": train(2, data, f"out_dir={root / 'fsdp'}", "train.parallel=fsdp", "train.sample_tokens=40"),
        "zero2": train(2, data, f"out_dir={root / 'zero2'}", "train.parallel=fsdp", "train.reshard_after_forward=false",
                       "train.activation_checkpointing=true"),
    }
    return root, logs


@pytest.mark.slow
def test_fsdp_ddp_and_one_rank_follow_one_loss_curve(runs):
    root, logs = runs
    assert "world_size=2 launcher=torchrun device=cpu parallel=fsdp" in logs["fsdp"]
    curves = {name: losses(root / name) for name in logs}
    assert all(len(curve) == 20 for curve in curves.values())
    for name in ("ddp", "fsdp", "zero2"):
        assert max(abs(a - b) for a, b in zip(curves["one"], curves[name])) < 1e-4, (name, curves)
    assert max(abs(a - b) for a, b in zip(curves["fsdp"], curves["zero2"])) < 1e-4


def test_each_fsdp_rank_holds_half_of_the_state_that_a_ddp_rank_holds(runs):
    root, logs = runs
    ddp, fsdp = memory(root / "ddp"), memory(root / "fsdp")
    assert set(ddp) == {"param_bytes", "grad_bytes", "optimizer_bytes"}  # no GPU: no peak device memory
    for key in ddp:
        # Each dimension-0 shard is rounded up to whole rows: a little over half.
        assert 0.5 * ddp[key] <= fsdp[key] <= 0.55 * ddp[key], (key, ddp, fsdp)
    assert ddp["optimizer_bytes"] >= 2 * ddp["param_bytes"]  # AdamW's two moments
    assert "memory per rank: parameters" in logs["fsdp"]


@pytest.mark.slow
def test_sharded_checkpoints_replace_each_other_and_export_as_one_file_that_samples_the_same(runs, tmp_path):
    root, logs = runs
    run_dir = root / "fsdp"
    assert [p.name for p in run_dir.iterdir() if "ckpt" in p.name] == ["ckpt-00000020"]  # step 10's was removed
    assert sorted(p.name for p in (run_dir / "ckpt-00000020").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "run.pt"]
    whole = tmp_path / "whole.pt"
    exported = run_gptcore("export", "--ckpt", run_dir, "--out", whole)
    assert exported.returncode == 0 and "saved by 2 rank(s)" in exported.stdout, exported.stderr
    state = torch.load(whole, weights_only=True)
    assert state["step"] == 20 and state["optimizer"]["state"]  # AdamW's moments came along
    # The same weights as the DDP run's (which were never sharded), to rounding.
    reference = torch.load(root / "ddp" / "ckpt.pt", weights_only=True)["model"]
    assert max((state["model"][name] - reference[name]).abs().max().item() for name in reference) < 1e-4
    # The text the run printed from its own checkpoint, with its seed.
    printed = logs["fsdp"].split("---\n")[1].strip("\n")
    sampled = run_gptcore("sample", "--ckpt", whole, "--tokens", "40", "--seed", "1337")
    assert sampled.returncode == 0 and sampled.stdout.strip("\n") == printed, (sampled.stdout, printed)
    again = run_gptcore("export", "--ckpt", run_dir, "--out", whole)
    assert_one_line_error(again, 2, "already exists", "nothing was written")


@pytest.mark.slow
def test_a_sharded_run_resumes_bit_identically_and_on_another_number_of_ranks(runs, tmp_path, corpus):
    root, _ = runs
    straight = losses(root / "fsdp")
    data, fsdp = f"data.path={corpus}", "train.parallel=fsdp"
    two = tmp_path / "two"
    train(2, data, f"out_dir={two}", fsdp, "train.stop_at=10")
    shutil.copytree(two, tmp_path / "two_then_one")
    log = train(2, data, f"out_dir={two}", fsdp, "resume=auto")
    assert f"resumed from {two / 'ckpt-00000010'} at step 10" in log
    assert losses(two) == straight  # bit-identical
    train(1, data, f"out_dir={tmp_path / 'two_then_one'}", fsdp, "resume=auto")
    one = tmp_path / "one_then_two"
    train(1, data, f"out_dir={one}", fsdp, "train.stop_at=10")
    train(2, data, f"out_dir={one}", fsdp, "resume=auto")
    for resharded in (tmp_path / "two_then_one", one):
        curve = losses(resharded)
        assert len(curve) == 20 and max(abs(a - b) for a, b in zip(curve, straight)) < 1e-5, (resharded, curve)


def rank_process(torchrun: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(torchrun.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


@pytest.mark.slow
def test_a_checkpoint_killed_mid_write_is_never_loaded(tmp_path, corpus):
    """kill -9 of rank 1 while a checkpoint is being written: the temporary directory never gets
    a checkpoint's name, and the rerun resumes from the one before. A model large enough that a
    checkpoint takes a while to write, one every step."""
    run_dir = tmp_path / "run"
    args = command(2, f"data.path={corpus}", f"out_dir={run_dir}", "train.parallel=fsdp", "model.n_layer=4",
                   "model.n_embd=256", "model.n_head=4", "train.max_iters=1000", "train.ckpt_interval=1",
                   "train.eval_interval=1000")
    torchrun = subprocess.Popen(args, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        seen = None
        while seen is None and time.monotonic() < deadline and torchrun.poll() is None:
            done = newest(run_dir)
            writing = [p for p in run_dir.glob(".ckpt-*.tmp")] if run_dir.is_dir() else []
            if done is not None and writing:  # past the first checkpoint, into another
                victim = rank_process(torchrun, 1)
                victim.send_signal(signal.SIGKILL)
                seen = writing[0].name
            time.sleep(0.001)
        output, _ = torchrun.communicate(timeout=120)
    finally:
        torchrun.kill()
    assert seen is not None, output
    step_being_written = int(seen[len(".ckpt-"):-len(".tmp")])
    assert torchrun.returncode != 0
    kept = newest(run_dir)
    assert int(kept.name.split("-")[1]) < step_being_written, (kept, seen)  # it never became a checkpoint
    resumed = subprocess.run(command(1, f"data.path={corpus}", f"out_dir={run_dir}", "train.parallel=fsdp",
                                     "model.n_layer=4", "model.n_embd=256", "model.n_head=4", "resume=auto",
                                     f"train.max_iters={int(kept.name.split('-')[1]) + 1}"),
                             cwd=REPO, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {kept} at step" in resumed.stdout
    assert not list(run_dir.glob(".ckpt-*.tmp"))  # the half-written one was cleared by the next save


def test_the_path_in_sharded_metadata_reads_whichever_python_wrote_it():
    """DCP pickles the checkpoint's path into its metadata: as pathlib.PosixPath up to Python 3.12,
    as pathlib._local.PosixPath from 3.13. Both are read, on any Python."""
    assert MetadataUnpickler(io.BytesIO(pickle.dumps(Path("/runs/ckpt"))), Path("ckpt")).load() == Path("/runs/ckpt")
    for module in ("pathlib", "pathlib._local"):
        assert MetadataUnpickler(io.BytesIO(), Path("ckpt")).find_class(module, "PosixPath") is PosixPath


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/gptcore-metadata-ran-code",))


@pytest.mark.slow
def test_sharded_checkpoints_refuse_what_they_cannot_be(runs, tmp_path):
    root, _ = runs
    # DDP's run directory resumed as fsdp, and an fsdp one as ddp: one line each, nothing written.
    refused = run_gptcore("train", *TINY, f"out_dir={root / 'ddp'}", "train.parallel=fsdp", "resume=auto")
    assert_one_line_error(refused, 2, "train.parallel=ddp checkpoint")
    refused = run_gptcore("train", *TINY, f"out_dir={root / 'fsdp'}", "resume=auto")
    assert_one_line_error(refused, 2, "sharded (train.parallel=fsdp) checkpoint", "gptcore export")
    # A checkpoint whose metadata pickle would run code is refused before anything runs.
    copy = tmp_path / "ckpt-00000020"
    shutil.copytree(root / "fsdp" / "ckpt-00000020", copy)
    (copy / ".metadata").write_bytes(pickle.dumps(RunsCode()))
    refused = run_gptcore("sample", "--ckpt", copy, "--tokens", "5")
    assert_one_line_error(refused, 2, "wants to run code", "posix.system")
    assert not os.path.exists("/tmp/gptcore-metadata-ran-code")
    # Nor may its metadata send the reader to files outside the checkpoint.
    shutil.copy(root / "fsdp" / "ckpt-00000020" / ".metadata", copy / ".metadata")
    with open(copy / ".metadata", "rb") as handle:
        metadata = pickle.load(handle)  # the test's own file: trusted
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first] = dataclasses.replace(metadata.storage_data[first], relative_path="../../../etc/passwd")
    (copy / ".metadata").write_bytes(pickle.dumps(metadata))
    refused = run_gptcore("export", "--ckpt", copy, "--out", tmp_path / "whole.pt")
    assert_one_line_error(refused, 2, "names files that are not its shards", "../../../etc/passwd")
    assert not (tmp_path / "whole.pt").exists()


@pytest.mark.slow
def test_a_shard_cut_short_is_one_line_for_a_reader_and_for_a_resume(runs, tmp_path, corpus):
    """A copy of a sharded run that stopped half-way through a shard file."""
    root, _ = runs
    cut = tmp_path / "cut"
    shutil.copytree(root / "fsdp", cut)
    shard = cut / "ckpt-00000020" / "__1_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    refused = run_gptcore("eval", "--ckpt", cut, "--batches", "1")
    assert_one_line_error(refused, 2, f"checkpoint {cut / 'ckpt-00000020'} is damaged or incomplete")
    refused = run_gptcore("train", *TINY, f"out_dir={cut}", f"data.path={corpus}", "train.parallel=fsdp", "resume=auto",
                          "train.max_iters=30")
    assert_one_line_error(refused, 2, f"checkpoint {cut / 'ckpt-00000020'} is damaged")
