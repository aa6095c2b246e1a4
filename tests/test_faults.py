"""Faults as clusters and careless or hostile users deliver them, on real processes: signals, two
runs in one directory, a full disk, a killed save, a changed model, a checkpoint or config that
tries to read, write or allocate what it should not, a pipe for data, a stopped rank."""

import errno
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, assert_one_line_error, gptcore_here, run_gptcore, run_metrics, step_losses, wait_until
from gptcore.checkpointing import checkpoint
from gptcore.telemetry.metrics import read_metrics

TINY = ["--config", "tiny", "train.device=cpu", "train.sample_tokens=0"]
# Long enough (~5 s) for a signal or a second run to land mid-way; a log line every 25 steps.
LONG = ["train.max_iters=1000", "train.log_interval=25", "train.eval_interval=1000", "train.ckpt_interval=500"]


def start(*args, env=None, **popen) -> subprocess.Popen:
    """`python -m gptcore ARGS` in the background, line-buffered output."""
    return subprocess.Popen([sys.executable, "-m", "gptcore", *map(str, args)], cwd=REPO, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def read_until(process: subprocess.Popen, fragment: str) -> list[str]:
    """Lines of stdout up to and including the first that holds fragment."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if fragment in line:
            return lines
    raise AssertionError(f"the process ended before printing {fragment!r}: {''.join(lines)}{process.stderr.read()}")


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for the signal (its SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask & (1 << (signum - 1)))


def finish(process: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "ckpt.pt", weights_only=True)["model"]


def same_weights(a: Path, b: Path) -> bool:
    first, second = weights(a), weights(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# -- signals --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_and_a_rerun_ends_like_a_straight_run(tmp_path, corpus):
    common = [*TINY, f"data.path={corpus}", *LONG]
    straight = tmp_path / "straight"
    assert run_gptcore("train", *common, f"out_dir={straight}").returncode == 0
    run_dir = tmp_path / "stopped"
    process = start("train", *common, f"out_dir={run_dir}")
    logged = read_until(process, "step 100/")
    process.send_signal(signal.SIGTERM)
    result = finish(process)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    last = (("".join(logged) + result.stdout).strip().splitlines())[-1]
    saved = checkpoint.load(run_dir / "ckpt.pt")["step"]
    assert last == (f"stopped by SIGTERM at step {saved}/1000: checkpoint {run_dir / 'ckpt.pt'} saved; "
                    "a rerun with resume=auto continues from it")
    assert 100 <= saved < 1000 and not list(run_dir.glob(".*.tmp"))
    assert "requeue" not in result.stdout  # a SIGTERM may be a user's scancel: never requeued
    again = run_gptcore("train", *common, f"out_dir={run_dir}", "resume=auto")
    assert again.returncode == 0 and f"resumed from {run_dir / 'ckpt.pt'} at step {saved}" in again.stdout
    assert same_weights(run_dir, straight)
    logged_steps = [r["step"] for r in run_metrics(run_dir) if "loss" in r]
    assert logged_steps == sorted(set(logged_steps)) and logged_steps[-1] == 1000


def test_a_signal_during_set_up_stops_at_the_first_step_without_a_signal_status(tmp_path, corpus):
    run_dir = tmp_path / "early"
    process = start("train", *TINY, f"data.path={corpus}", f"out_dir={run_dir}", *LONG)
    wait_until(lambda: catches(process.pid, signal.SIGUSR1), 20, "the handler")
    process.send_signal(signal.SIGUSR1)  # still importing torch or setting up: before the loop
    result = finish(process)
    assert result.returncode == 0, (result.returncode, result.stderr)  # not -10
    assert "stopped by SIGUSR1 at step" in result.stdout
    assert checkpoint.load(run_dir / "ckpt.pt")["step"] <= 2


@pytest.mark.slow
def test_a_sigterm_during_the_final_sample_does_not_fail_a_finished_run(tmp_path, corpus):
    run_dir = tmp_path / "done"
    process = start("train", "--config", "tiny", "train.device=cpu", f"data.path={corpus}", f"out_dir={run_dir}",
                    "train.sample_tokens=10000")
    read_until(process, "eval step 20:")  # training is over; the sample is being drawn
    process.send_signal(signal.SIGTERM)
    result = finish(process)
    assert result.returncode == 0 and "--- sample (10000 tokens" in result.stdout, (result.returncode, result.stderr)


# -- one run per directory ---------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_into_a_busy_directory_is_refused_and_the_first_is_untouched(tmp_path, corpus):
    run_dir = tmp_path / "busy"
    first = start("train", *TINY, f"data.path={corpus}", f"out_dir={run_dir}", *LONG, "train.max_iters=100000")
    read_until(first, "step 25/")
    started = time.monotonic()
    for resume in ("never", "auto"):  # a fresh run, and a resume=auto that would join the live run
        second = run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={run_dir}", *LONG, "train.lr=1e-2",
                             f"resume={resume}")
        assert_one_line_error(second, 2, f"{run_dir} is in use by another training run", f"pid {first.pid} on")
    # Two refusals without waiting on the live run (which never ends by itself); the bound is wide, as
    # a start-up on a busy machine takes several seconds.
    assert time.monotonic() - started < 60
    assert first.poll() is None  # still training
    first.send_signal(signal.SIGTERM)
    result = finish(first)
    assert result.returncode == 0 and "stopped by SIGTERM" in result.stdout, result.stderr
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 3e-3  # the first run's
    steps = [r["step"] for r in run_metrics(run_dir) if "loss" in r]
    assert steps == list(range(25, steps[-1] + 1, 25))  # every step once, from the first run alone


def test_a_fresh_run_moves_an_earlier_runs_files_aside_instead_of_appending(tmp_path, corpus):
    run_dir = tmp_path / "reused"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 5, "loss": 9.0}\n')  # a run killed before its first checkpoint
    result = run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={run_dir}")
    assert result.returncode == 0 and "moved the files of an earlier run without a checkpoint to" in result.stdout
    (earlier,) = run_dir.glob("earlier-*")
    assert (earlier / "metrics.jsonl").read_text() == '{"step": 5, "loss": 9.0}\n'
    assert [r["step"] for r in run_metrics(run_dir) if "loss" in r] == [5, 10, 15, 20]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_eval_reads_whole_checkpoints_while_a_training_keeps_replacing_them(tmp_path, corpus, capsys, parallel):
    """A training replaces its checkpoint every 5 steps (ddp: a new file renamed over ckpt.pt; fsdp: a
    new ckpt-N/ directory, then the older one removed) while eval reads it again and again, with a
    sample and a quantize among the reads: every read is of one whole checkpoint, never a mix or a
    vanished one called damaged."""
    run_dir = tmp_path / "run"
    training = start("train", *TINY, f"out_dir={run_dir}", f"data.path={corpus}", "train.max_iters=1000000",
                     "train.ckpt_interval=5", "train.log_interval=50", "train.eval_interval=1000000",
                     f"train.parallel={parallel}", "profile.sampler=false")
    target = run_dir if parallel == "fsdp" else run_dir / "ckpt.pt"
    losses = []
    try:
        read_until(training, "step 50/")
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            result = gptcore_here(capsys, "eval", "--ckpt", target, "--batches", "1", "--batch-size", "4", "--json")
            assert result.returncode == 0 and not result.stderr, result.stderr
            losses.append(json.loads(result.stdout)["val_loss"])
        sampled = gptcore_here(capsys, "sample", "--ckpt", target, "--tokens", "5", "--prompt", "the")
        quantized = gptcore_here(capsys, "quantize", "--ckpt", target, "--mode", "int8", "--out", tmp_path / "q.pt",
                                 "--eval-batches", "1", "--bench-tokens", "10")
        assert training.poll() is None, training.stderr.read()  # it trained on throughout
    finally:
        training.kill()
        training.wait()
    assert len(losses) >= 5 and len(set(losses)) >= 3, losses  # several checkpoints read, each whole
    assert sampled.returncode == 0 and sampled.stdout.startswith("the"), sampled.stderr
    assert quantized.returncode == 0 and (tmp_path / "q.pt").is_file(), quantized.stderr


@pytest.mark.slow
def test_temporary_files_left_by_a_killed_save_are_removed_at_start(tmp_path, corpus):
    run_dir = tmp_path / "killed"
    assert run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={run_dir}", "train.stop_at=10").returncode == 0
    orphan = run_dir / ".ckpt.pt.k3y9x1.tmp"
    orphan.write_bytes(b"\0" * 4096)
    result = run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={run_dir}", "resume=auto")
    assert result.returncode == 0 and f"removed {orphan}" in result.stdout and not orphan.exists()


# -- a diverged run keeps a checkpoint that is really good ------------------------------------------

def test_a_diverging_run_keeps_a_checkpoint_whose_loss_is_finite(tmp_path, corpus):
    run_dir = tmp_path / "nan"
    result = run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={run_dir}", "train.lr=100",
                         "train.warmup_iters=0", "train.ckpt_interval=1", "train.log_interval=1")
    assert_one_line_error(result, 1, "NaN/inf", "is kept (the last good one)")
    evaluated = run_gptcore("eval", "--ckpt", run_dir / "ckpt.pt", "--json", "--batches", "4")
    assert evaluated.returncode == 0, evaluated.stderr
    assert math.isfinite(json.loads(evaluated.stdout)["val_loss"])  # it used to be nan


# -- resuming with another model or text --------------------------------------------------------------

@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, corpus):
    """A run stopped at step 10 of 20; tests that resume it work on a copy."""
    run_dir = tmp_path_factory.mktemp("stopped") / "half"
    assert run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={run_dir}", "train.stop_at=10").returncode == 0
    return run_dir


@pytest.mark.parametrize("change, listed", [
    (["model.n_embd=64"], "model.n_embd=32 (asked 64)"),
    (["model.n_head=4"], "model.n_head=2 (asked 4)"),  # the same tensor shapes: silently another model before
    (["model.n_layer=3", "model.block_size=16"], "model.n_layer=2 (asked 3), model.block_size=32 (asked 16)"),
])
def test_resuming_another_architecture_is_refused_naming_the_keys(stopped_run, corpus, change, listed):
    before = (stopped_run / "ckpt.pt").read_bytes()
    result = run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={stopped_run}", "resume=auto", *change)
    assert_one_line_error(result, 2, "holds another model", listed)
    assert (stopped_run / "ckpt.pt").read_bytes() == before


def test_schedule_and_length_may_change_on_resume(stopped_run, corpus, tmp_path):
    run_dir = Path(shutil.copytree(stopped_run, tmp_path / "copy"))
    result = run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={run_dir}", "resume=auto",
                         "train.max_iters=30", "train.lr=1e-3", "train.log_interval=10")
    assert result.returncode == 0, result.stderr
    assert max(step_losses(run_dir)) == 30


def test_text_of_another_vocabulary_is_refused_before_the_prepared_data_is_touched(stopped_run, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("ZYXWVUTSRQ 0123456789 !@#$%^&*()\n" * 400)
    prepared = {p.name: p.read_bytes() for p in (stopped_run / "data").iterdir()}
    result = run_gptcore("train", *TINY, f"data.path={other}", f"out_dir={stopped_run}", "resume=auto")
    assert_one_line_error(result, 2, "character(s) that the checkpoint being resumed never saw", "0123456789")
    assert {p.name: p.read_bytes() for p in (stopped_run / "data").iterdir()} == prepared


# -- a full disk ------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB tmpfs (root only), so that writes end in ENOSPC."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path, leave: int) -> None:
    """Fill the disk to within `leave` bytes of full. A training beside it may write between the
    measure and the filler's own write; then the disk is full a little sooner, which is no error."""
    with open(disk / "filler", "wb", buffering=0) as filler:
        while (free := os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize) > leave:
            try:
                filler.write(b"\0" * min(free - leave, 1 << 16))
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                return


@pytest.mark.slow
def test_a_full_disk_mid_run_is_one_line_and_a_resume_repairs_the_metrics(small_disk, tmp_path, corpus):
    data = tmp_path / "data"  # the prepared text stays off the small disk
    assert run_gptcore("prepare", "--data", corpus, "--out", data).returncode == 0
    run_dir = small_disk / "run"
    common = [*TINY, f"data.path={data}", f"out_dir={run_dir}", "train.max_iters=4000", "train.log_interval=1",
              "train.ckpt_interval=200", "train.eval_interval=1000"]
    process = start("train", *common)
    read_until(process, "step 250/")  # the step-200 checkpoint is on disk
    good = checkpoint.load(run_dir / "ckpt.pt")["step"]
    fill(small_disk, leave=300)  # room for about one more metrics line, none for a checkpoint
    result = finish(process)
    assert_one_line_error(result, 1, "metrics.jsonl")
    assert checkpoint.load(run_dir / "ckpt.pt")["step"] == good and not list(run_dir.glob(".*.tmp"))
    torn = (run_dir / "metrics.jsonl").read_bytes()
    (small_disk / "filler").unlink()
    records = read_metrics(run_dir / "metrics.jsonl")  # a cut-off last line is left out, not an error
    assert records and records[-1]["step"] >= good
    again = run_gptcore("train", *common, "resume=auto", "train.max_iters=400", "train.log_interval=50")
    assert again.returncode == 0, again.stderr
    assert [r["step"] for r in run_metrics(run_dir) if "loss" in r] == \
        [r["step"] for r in records if "loss" in r and r["step"] <= good] + list(range(good + 50, 401, 50))
    assert (run_dir / "metrics.jsonl").read_bytes().endswith(b"\n") and len(torn) > 0


def test_a_full_disk_at_a_checkpoint_keeps_the_old_one(small_disk, tmp_path, corpus):
    data = tmp_path / "data"
    assert run_gptcore("prepare", "--data", corpus, "--out", data).returncode == 0
    run_dir = small_disk / "run"
    process = start("train", *TINY, f"data.path={data}", f"out_dir={run_dir}", "train.max_iters=4000",
                    "train.log_interval=100", "train.ckpt_interval=300", "train.eval_interval=1000")
    read_until(process, "step 400/")
    fill(small_disk, leave=20_000)  # metrics lines still fit, a 400 KB checkpoint does not
    result = finish(process)
    assert_one_line_error(result, 1, "no space left on the device to write", "(step 300) is kept")
    assert checkpoint.load(run_dir / "ckpt.pt")["step"] == 300 and not list(run_dir.glob(".*.tmp"))


def test_every_writer_on_a_full_disk_is_one_line_and_leaves_nothing(small_disk, trained, tmp_path, corpus, capsys):
    ckpt = trained / "ckpt.pt"
    nano = tmp_path / "nano"  # a nanoGPT checkpoint to import, written off the small disk
    assert gptcore_here(capsys, "export", "--ckpt", ckpt, "--format", "nanogpt", "--out", nano).returncode == 0
    fill(small_disk, leave=4096)
    for args in (("prepare", "--data", corpus, "--out", small_disk / "prepared"),
                 ("export", "--ckpt", ckpt, "--format", "hf", "--out", small_disk / "hf"),
                 ("export", "--ckpt", ckpt, "--format", "nanogpt", "--out", small_disk / "nano"),
                 ("export", "--ckpt", ckpt, "--format", "gguf", "--type", "f32", "--out", small_disk / "m.gguf"),
                 ("quantize", "--ckpt", ckpt, "--mode", "int8", "--out", small_disk / "q.pt", "--bench-tokens", "0"),
                 ("import", "--nanogpt", nano / "ckpt.pt", "--meta", nano / "meta.pkl", "--out", small_disk / "i.pt")):
        result = gptcore_here(capsys, *args)
        assert_one_line_error(result, 1, "could not write", f"df -h {small_disk}")
        assert sorted(os.listdir(small_disk)) == ["filler"], args  # no partial file, no empty directory


def test_an_input_cut_while_prepare_reads_it_is_refused(tmp_path):
    """The probe's case: a large text truncated while prepare reads it. The cut lands the moment a
    prepare process holds the file open (prepare reads ~100 MB/s here: the watch must be quick)."""
    import psutil

    text = tmp_path / "big.txt"
    text.write_bytes(b"To be, or not to be, that is the question.\n" * 1_500_000)  # 66 MB
    out = tmp_path / "prepared"
    process = start("prepare", "--data", text, "--out", out)
    deadline, cut = time.monotonic() + 30, False
    while not cut and process.poll() is None and time.monotonic() < deadline:
        try:
            family = [process.pid, *(child.pid for child in psutil.Process(process.pid).children(recursive=True))]
        except psutil.NoSuchProcess:
            break
        for pid in family:
            try:
                cut = cut or any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(text) for fd in os.listdir(f"/proc/{pid}/fd"))
            except OSError:  # the process or the descriptor went away meanwhile
                continue
        if cut:
            os.truncate(text, 1000)
        time.sleep(0.002)
    result = finish(process)
    assert cut, "prepare finished before the text could be cut"
    assert_one_line_error(result, 2, f"data file {text} changed while it was read", "nothing was written")
    assert not out.exists()


# -- untrusted files ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    assert run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={run_dir}").returncode == 0
    return run_dir


def rewritten(source: Path, target: Path, change) -> Path:
    state = torch.load(source, weights_only=True)
    change(state)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target


def test_prepare_into_a_run_directory_is_refused_and_the_run_is_untouched(trained, corpus, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in trained.iterdir()}
    refused = gptcore_here(capsys, "prepare", "--data", corpus, "--out", trained)
    assert_one_line_error(refused, 2, "is a training run's directory", "ckpt.pt", f"--out {trained / 'data'}")
    assert {p.name: p.stat().st_mtime_ns for p in trained.iterdir()} == before


def test_a_checkpoint_cannot_make_eval_or_quantize_read_or_write_where_it_says(trained, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("the key to everything\n" * 100)
    elsewhere = tmp_path / "elsewhere"
    def plant(state):
        state["config"]["data"]["path"] = str(secret)
        state["config"]["out_dir"] = str(elsewhere)
    crafted = rewritten(trained / "ckpt.pt", tmp_path / "inbox" / "ckpt.pt", plant)
    assert_one_line_error(gptcore_here(capsys, "eval", "--ckpt", crafted), 2, "no prepared data beside", "--data")
    assert_one_line_error(gptcore_here(capsys, "quantize", "--ckpt", crafted, "--mode", "int8", "--out",
                                       tmp_path / "inbox" / "q.pt"), 2, "--data")
    assert not elsewhere.exists() and not (tmp_path / "inbox" / "data").exists()
    evaluated = gptcore_here(capsys, "eval", "--ckpt", crafted, "--data", trained / "data", "--json", "--batches", "2")
    assert evaluated.returncode == 0 and not elsewhere.exists()


def test_pickle_code_in_a_checkpoint_is_refused_naming_it_and_never_runs(tmp_path):
    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {ran}",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "gptcore-checkpoint", "payload": Payload()}, path)
    assert_one_line_error(run_gptcore("sample", "--ckpt", path), 2, "wants to run code", "system")
    assert not ran.exists()


def test_a_legacy_pickle_file_is_one_line_without_torchs_warning(trained, tmp_path, capsys):
    legacy = tmp_path / "legacy.pt"
    torch.save(torch.load(trained / "ckpt.pt", weights_only=True), legacy, _use_new_zipfile_serialization=False)
    assert_one_line_error(gptcore_here(capsys, "eval", "--ckpt", legacy), 2, "cannot be read", "zip")


def test_a_config_bomb_in_a_checkpoint_is_refused_at_once(trained, tmp_path, capsys):
    """Shared references nested 40 deep: 2^40 entries if anything walked them."""
    bomb = ["x"]
    for _ in range(40):
        bomb = [bomb, bomb]
    crafted = rewritten(trained / "ckpt.pt", tmp_path / "bomb.pt",
                        lambda state: state["config"]["train"].update(lr=bomb))
    started = time.monotonic()
    assert_one_line_error(gptcore_here(capsys, "eval", "--ckpt", crafted, "--data", trained / "data"), 2, "train.lr")
    assert time.monotonic() - started < 30


def test_a_header_that_claims_a_huge_model_is_refused_before_building_it(trained, tmp_path, capsys):
    crafted = rewritten(trained / "ckpt.pt", tmp_path / "deep.pt",
                        lambda state: state["config"]["model"].update(n_layer=900, n_embd=1024, n_head=8))
    started = time.monotonic()
    assert_one_line_error(gptcore_here(capsys, "sample", "--ckpt", crafted), 2, "parameters", "header was altered")
    assert time.monotonic() - started < 30
    assert_one_line_error(gptcore_here(capsys, "sample", "--ckpt", rewritten(
        trained / "ckpt.pt", tmp_path / "deeper.pt", lambda state: state["config"]["model"].update(n_layer=100000))),
        2, "model.n_layer=100000 is more than 1000 layers")


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\ntrain:\n  lr: *a11\n")
    started = time.monotonic()
    assert_one_line_error(gptcore_here(capsys, "train", "--config", bomb), 2, "unknown config key 'a0'")
    assert time.monotonic() - started < 20


@pytest.mark.parametrize("override, fragment", [
    ("model.n_layer=100000", "more than 1000 layers"),
    ("train.batch_size=100000000", "need about"),
])
def test_sizes_that_cannot_fit_are_refused_before_allocating(tmp_path, corpus, override, fragment):
    assert_one_line_error(run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={tmp_path / 'r'}", override),
                          2, fragment)


# -- data that is not a file ---------------------------------------------------------------------------

def test_a_fifo_or_a_device_as_data_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero")):
        started = time.monotonic()
        assert_one_line_error(run_gptcore("train", *TINY, f"data.path={path}", f"out_dir={tmp_path / 'r'}",
                                          timeout=60), 2, "is not a regular file")
        assert time.monotonic() - started < 20


# -- values on the command line ------------------------------------------------------------------------

QUANTIZE = ["quantize", "--ckpt", "x.pt", "--mode", "int4", "--out", "q.pt"]


# Every numeric flag of every subcommand, below its floor, above its ceiling, and not a number.
@pytest.mark.parametrize("args, shown", [
    (["prepare", "--data", "x.txt", "--workers", "0"], "--workers: must be at least 1"),
    (["prepare", "--data", "x.txt", "--workers", "100000"], "four per CPU this process may use"),
    (["prepare", "--data", "x.txt", "--workers", "two"], "'two' is not a whole number"),
    (["sample", "--ckpt", "x.pt", "--tokens", "0"], "--tokens: must be at least 1"),
    (["sample", "--ckpt", "x.pt", "--tokens", "10000000000000"], "--tokens: must be at most 10,000,000 (held in memory)"),
    (["sample", "--ckpt", "x.pt", "--tokens", "1e3"], "'1e3' is not a whole number"),
    (["sample", "--ckpt", "x.pt", "--temperature", "-1"], "--temperature: must be a finite number of at least 0"),
    (["sample", "--ckpt", "x.pt", "--temperature", "inf"], "--temperature: must be a finite number"),
    (["sample", "--ckpt", "x.pt", "--temperature", "nan"], "--temperature: must be a finite number"),
    (["sample", "--ckpt", "x.pt", "--top-k", "-1"], "--top-k: must be at least 0"),
    (["sample", "--ckpt", "x.pt", "--seed", "-1"], "--seed: must be at least 0"),
    (["sample", "--ckpt", "x.pt", "--seed", str(2**64)], "--seed: must be at most 18,446,744,073,709,551,615"),
    (["sample", "--ckpt", "x.pt", "--threads", "-1"], "--threads: must be at least 0"),
    (["eval", "--ckpt", "x.pt", "--batches", "0"], "--batches: must be at least 1"),
    (["eval", "--ckpt", "x.pt", "--batches", "10000000"], "--batches: must be at most 1,000,000"),
    (["eval", "--ckpt", "x.pt", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["eval", "--ckpt", "x.pt", "--batch-size", "1000000000"], "--batch-size: must be at most 4,096"),
    ([*QUANTIZE, "--group-size", "0"], "--group-size: must be at least 1"),
    ([*QUANTIZE, "--group-size", "x"], "'x' is not a whole number"),
    ([*QUANTIZE, "--eval-batches", "-1"], "--eval-batches: must be at least 0"),
    ([*QUANTIZE, "--eval-batches", "10000000"], "--eval-batches: must be at most 1,000,000"),
    ([*QUANTIZE, "--batch-size", "0"], "--batch-size: must be at least 1"),
    ([*QUANTIZE, "--batch-size", "99999"], "--batch-size: must be at most 4,096"),
    ([*QUANTIZE, "--bench-tokens", "-5"], "--bench-tokens: must be at least 0"),
    ([*QUANTIZE, "--bench-tokens", "10000000000"], "--bench-tokens: must be at most 10,000,000"),
])
def test_numeric_flags_out_of_bounds_are_one_line_before_any_file_is_read(capsys, args, shown):
    assert_one_line_error(gptcore_here(capsys, *args), 2, shown)


def test_a_device_that_is_none_is_one_line(trained, capsys):
    for command in ("sample", "eval"):
        assert_one_line_error(gptcore_here(capsys, command, "--ckpt", trained / "ckpt.pt", "--device", "bogus"), 2,
                              "is not a device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(trained, capsys):
    for command in ("sample", "eval"):
        assert_one_line_error(gptcore_here(capsys, command, "--ckpt", trained / "ckpt.pt", "--device", "cuda"), 2,
                              "no CUDA device")


def test_an_out_dir_that_is_a_file_or_unwritable_is_one_line(tmp_path, corpus):
    a_file = tmp_path / "file"
    a_file.write_text("keep me\n")
    assert_one_line_error(run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={a_file}"), 2, "is a file")
    assert a_file.read_text() == "keep me\n"
    if os.geteuid() == 0:
        return  # root writes anywhere
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert_one_line_error(run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={locked / 'run'}"), 2,
                          "cannot be written")


def test_an_output_that_cannot_be_written_where_named_is_one_line_before_any_work(trained, tmp_path, corpus, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("keep me\n")
    ckpt, under_a_file = trained / "ckpt.pt", a_file / "sub"
    for args, problem in [
        (("quantize", "--ckpt", ckpt, "--mode", "int8", "--out", under_a_file / "q.pt"), f"{a_file} is a file"),
        (("quantize", "--ckpt", ckpt, "--mode", "int8", "--out", tmp_path), "is a directory, not a file"),
        (("quantize", "--ckpt", ckpt, "--mode", "int8", "--out", tmp_path / "q.pt", "--eval-batches", "0"),
         "which is a directory"),  # q.json, where the report goes, made a directory below
        (("export", "--ckpt", ckpt, "--format", "gguf", "--out", under_a_file / "m.gguf"), f"{a_file} is a file"),
        (("export", "--ckpt", ckpt, "--format", "hf", "--out", under_a_file), f"{a_file} is a file"),
        (("import", "--nanogpt", ckpt, "--out", under_a_file / "c.pt"), f"{a_file} is a file"),
        (("prepare", "--data", corpus, "--out", under_a_file), f"{a_file} is a file"),
        (("prepare", "--data", corpus, "--out", a_file), "is a file, not a directory"),
    ]:
        (tmp_path / "q.json").mkdir(exist_ok=True)
        assert_one_line_error(gptcore_here(capsys, *args), 2, problem, "choose another --out")
    assert a_file.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "q.json"] and not any((tmp_path / "q.json").iterdir())
    reported = subprocess.run([sys.executable, "-m", "analysis.report", trained, "--out", under_a_file], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    assert_one_line_error(reported, 2, f"{a_file} is a file", "choose another --out")


@pytest.mark.parametrize("env, fragment", [
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "abc"}, "MASTER_PORT='abc' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not a rank of WORLD_SIZE=2"),
])
def test_a_rank_environment_that_would_hang_is_one_line_at_once(tmp_path, corpus, env, fragment):
    started = time.monotonic()
    assert_one_line_error(run_gptcore("train", *TINY, f"data.path={corpus}", f"out_dir={tmp_path / 'r'}", env=env),
                          2, fragment)
    assert time.monotonic() - started < 20


# -- a stopped rank --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_rank_stopped_by_sigstop_makes_the_other_say_where_it_waited(tmp_path, corpus):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run_dir = tmp_path / "run"
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    # No evaluation and no checkpoint near step 200, where the wait would be the longer timeout_s.
    args = ["train", *TINY, f"data.path={corpus}", f"out_dir={run_dir}", "train.max_iters=100000",
            "train.log_interval=20", "train.eval_interval=100000", "train.ckpt_interval=150",
            "train.step_timeout_s=4", "train.timeout_s=120"]
    survivor = start(*args, env={**env, "RANK": "0", "LOCAL_RANK": "0"})
    victim = subprocess.Popen([sys.executable, "-m", "gptcore", *args], cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1", **env, "RANK": "1", "LOCAL_RANK": "0"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        read_until(survivor, "step 200/")
        victim.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        result = finish(survivor, timeout=90)
        waited = time.monotonic() - stopped
    finally:
        for process in (survivor, victim):
            process.kill()
            process.wait()
    stack = run_dir / "hang" / "rank0.txt"
    assert_one_line_error(result, 1, "rank 0 has waited more than 4 s for the other ranks", str(stack),
                          "(step 150) is kept")
    assert waited < 60
    text = stack.read_text()
    assert "Thread" in text and ("in train_step" in text or "in window" in text), text
