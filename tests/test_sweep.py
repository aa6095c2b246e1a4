"""`python launch/sweep.py`: the same training at several sizes, then the scaling report. Local
processes (no Slurm needed) and the local Slurm cluster (skipped when it is not up). A fake
nvidia-smi on PATH stands in for the GPUs this machine lacks. The sweeps on the Slurm cluster are in
test_slurm.py, where the cluster's tests run one after another."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, SWEEP_TRAIN, assert_one_line_error, report_rows, sweep, sweep_command
from doc_commands import every_command, split
from gptcore.cluster.spinning import SHARED_NODE_PCT

def test_bad_gpu_lists_fail_in_one_line_before_anything_is_submitted(tmp_path):
    out = tmp_path / "sweep"
    assert_one_line_error(sweep("--gpus", "0", "--out", out), 2, "--gpus '0'")
    assert_one_line_error(sweep("--gpus", "a,b", "--out", out), 2, "--gpus 'a,b'")
    assert_one_line_error(sweep("--gpus", "1,2", "--parallel", "ddp,zero", "--config", "tiny", "--executor", "local",
                                "--out", out), 2, "'zero' is not a strategy")
    assert_one_line_error(sweep("--gpus", "1,3", "--config", "tiny", "--executor", "local", "--out", out),
                          2, "train.batch_size=8", "3 ranks")
    assert not out.exists()
    assert_one_line_error(subprocess.run([sys.executable, "-m", "analysis.report", tmp_path, "--out", out], cwd=REPO,
                                         capture_output=True, text=True, timeout=60), 2, "not a finished training run")


def test_dry_run_prints_the_plan_and_submits_nothing(tmp_path):
    out = tmp_path / "sweep"
    result = sweep("--gpus", "1,2", "--executor", "local", "--dry-run", "--out", out, *SWEEP_TRAIN)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "would submit 2 job(s) (local processes, --time 60 min):"
    assert lines[1].startswith("  sweep-n1: 1 GPU(s) x 1 node(s) = 1 rank(s): gptcore train --config tiny")
    assert f"out_dir={out}/n2" in lines[2] and "profile.cprofile=true" in lines[2]
    assert lines[-1] == f"report: {out}/report/report.md"
    assert not out.exists()


def test_repeats_interleave_the_sizes(tmp_path):
    result = sweep("--gpus", "1,2", "--executor", "local", "--repeats", "2", "--dry-run", "--out", tmp_path / "s", *SWEEP_TRAIN)
    assert result.returncode == 0, result.stderr
    names = [line.split(":")[0].strip() for line in result.stdout.splitlines()[1:-1]]
    assert names == ["sweep-n1-r1", "sweep-n2-r1", "sweep-n1-r2", "sweep-n2-r2"]


def test_every_sweep_in_the_docs_plans_as_typed(tmp_path):
    """Each `python launch/sweep.py` that the docs show, as typed, plus --dry-run (and the local
    executor, so that the plan does not hang on whether a cluster answers): the plan follows each
    of its flags. The sweeps themselves run in this file's other tests and in test_slurm.py."""
    sweeps = [split(command)[1][2:] for command in every_command() if command.startswith("python launch/sweep.py")]
    assert len(sweeps) >= 8
    for index, args in enumerate(sweeps):
        out = tmp_path / f"sweep{index}"
        local = [] if "--executor" in args else ["--executor", "local"]
        result = sweep(*args, *local, "--dry-run", "--out", out)
        if "--quantize" in args:  # a Slurm job after the sweep: its plan is test_slurm.py's
            assert_one_line_error(result, 2, "--quantize", "--executor slurm")
            continue
        assert result.returncode == 0, (args, result.stderr)

        def value(flag, default):
            return args[args.index(flag) + 1] if flag in args else default
        sizes, repeats = value("--gpus", "").split(","), int(value("--repeats", "1"))
        strategies = value("--parallel", "").split(",")  # [""]: one strategy, the config's
        jobs = result.stdout.splitlines()[1:-1]
        assert result.stdout.startswith(f"would submit {len(sizes) * repeats * len(strategies)} job(s)"), result.stdout
        overrides = [arg for arg in args if "=" in arg and not arg.startswith("--")]
        for job in jobs:
            assert f"gptcore train --config {value('--config', 'seed')} " in job, job
            assert all(override in job for override in overrides), job
            assert ("train.scaling=weak" in job) == ("weak" in args), job
        for strategy in filter(None, strategies):
            assert sum(f"train.parallel={strategy}" in job for job in jobs) == len(sizes), jobs
        assert not out.exists()


@pytest.mark.slow
def test_a_size_run_beside_other_load_is_flagged_and_nothing_is_concluded_from_it(tmp_path, corpus):
    """A CPU-burning process, not the job's, starts when the 2-rank size does and stops with it."""
    out = tmp_path / "sweep"
    process = subprocess.Popen(
        sweep_command("--gpus", "1,2", "--executor", "local", "--out", out, f"data.path={corpus}", *SWEEP_TRAIN,
                      "train.max_iters=200", "train.log_interval=10"),
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    burner = None
    try:
        deadline = time.monotonic() + 120
        while not (out / "n2" / "metrics.jsonl").exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        started = subprocess.run(["sh", "-c", f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                                 capture_output=True, text=True, timeout=10)
        burner = psutil.Process(int(started.stdout))
        burner.cpu_percent(None)  # from here on: what it takes while the 2-rank size runs
        stdout, stderr = process.communicate(timeout=180)
        burned = burner.cpu_percent(None) / psutil.cpu_count()  # % of the node, averaged over those seconds
    finally:
        process.kill()
        if burner is not None:
            burner.kill()
    assert process.returncode == 0, stdout + stderr
    report = json.loads((out / "report" / "report.json").read_text())
    one, two = report["runs"]
    # Others' load at 2 ranks holds at least what the burner took meanwhile (and whatever else the
    # node ran: another test beside this one, or a busy node, which may also hold the burner back).
    assert burned > 5 and two["others_cpu_pct"] > burned - 8, (burned, two["others_cpu_pct"])
    for run in (one, two):  # a size is flagged shared exactly when others took over 10% of its node
        assert ("shared" in [flag["kind"] for flag in run["flags"]]) == (run["others_cpu_pct"] > SHARED_NODE_PCT), run
    text = (out / "report" / "report.md").read_text()
    assert "No conclusion is drawn from these numbers: " in text  # at 1 rank too where the node was busy
    assert "at 2 rank(s), node shared: other processes used" in text
    shared = next(flag["text"] for flag in two["flags"] if flag["kind"] == "shared")  # and what it cost the size
    assert "its steps took" in shared or "no logged window ran without them" in shared, shared
    assert "lost time goes" not in text and "competed for cores" not in text


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) > 2, reason="oversubscribes only a machine of 2 cores")
def test_ranks_asking_for_more_threads_than_the_node_has_cores_are_flagged(tmp_path, corpus):
    out = tmp_path / "sweep"
    result = sweep("--gpus", "1,2", "--executor", "local", "--out", out, f"data.path={corpus}", *SWEEP_TRAIN, "train.threads=2")
    assert result.returncode == 0, result.stdout + result.stderr
    one, two = json.loads((out / "report" / "report.json").read_text())["runs"]
    assert (one["threads"], two["threads"], two["node_cpus"]) == (2, 2, 2)
    assert "oversubscribed" not in [flag["kind"] for flag in one["flags"]]
    assert "oversubscribed" in [flag["kind"] for flag in two["flags"]]
    assert "2 rank(s) x 2 thread(s) on 2 core(s)" in (out / "report" / "report.md").read_text()


@pytest.mark.slow
def test_local_sweep_reports_both_sizes_with_gpu_samples(tmp_path, corpus, fake_gpus):
    out = tmp_path / "sweep"
    result = sweep("--gpus", "1,2", "--executor", "local", "--out", out, f"data.path={corpus}", *SWEEP_TRAIN,
                   env=fake_gpus)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == f"report: {out}/report/report.md"
    assert "sweep-n2" in result.stdout and "40/40" in result.stdout  # the status table
    rows = report_rows(out / "report" / "report.md")
    assert [row["ranks"] for row in rows] == ["1", "2"]
    assert rows[0]["speedup"].startswith("1.00x") and rows[0]["efficiency"].startswith("100%")
    assert [row["threads/rank"] for row in rows] == ["1", "1"]  # the same for every size (train.cpu_ranks)
    samples = [json.loads(line) for line in (out / "n2" / "samples" / "node0.jsonl").read_text().splitlines()]
    assert all(sample["gpus"][0]["util_pct"] == 87.0 for sample in samples)
    assert "gpu0 87% / 31,245 of 81,559 MiB" in (out / "report" / "report.md").read_text()

    # The same report straight from the run directories.
    again = subprocess.run([sys.executable, "-m", "analysis.report", out / "n1", out / "n2", "--out", tmp_path / "again"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == str(tmp_path / "again" / "report.md"), again.stderr
    assert report_rows(tmp_path / "again" / "report.md") == rows

    # A run killed (or a disk that filled) while writing its metrics: the cut-off last line is
    # left out, once said; a damaged line inside the file is named by file and line, no report.
    torn = tmp_path / "torn"
    shutil.copytree(out / "n1", torn)
    with open(torn / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 3')
    cut = subprocess.run([sys.executable, "-m", "analysis.report", torn, "--out", tmp_path / "cut"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cut.returncode == 0 and (tmp_path / "cut" / "report.md").is_file(), cut.stderr
    assert cut.stderr.count("is cut off") == 1
    with open(torn / "metrics.jsonl", "a") as metrics:
        metrics.write('\n{"step": 4}\n')
    assert_one_line_error(subprocess.run([sys.executable, "-m", "analysis.report", torn, "--out", tmp_path / "none"],
                                         cwd=REPO, capture_output=True, text=True, timeout=120),
                          2, f"{torn / 'metrics.jsonl'}:", "is not valid JSON")
    assert not (tmp_path / "none" / "report.md").exists()


@pytest.mark.slow
def test_a_sweep_of_both_strategies_writes_one_report_that_compares_them(tmp_path, corpus):
    out = tmp_path / "sweep"
    # Sizes 1 and 2: 4 ranks on this suite's 2 cores would only measure oversubscription.
    result = sweep("--gpus", "1,2", "--parallel", "ddp,fsdp", "--config", "tiny", "--executor", "local",
                   "--out", out, f"data.path={corpus}", *SWEEP_TRAIN, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("n")) == [
        "n1-ddp", "n1-fsdp", "n2-ddp", "n2-fsdp"]
    rows = report_rows(out / "report" / "report.md")
    assert [(row["parallel"], row["ranks"]) for row in rows] == [
        ("ddp", "1"), ("ddp", "2"), ("fsdp", "1"), ("fsdp", "2")]
    assert all(row["efficiency"].startswith("100%") for row in rows if row["ranks"] == "1")  # each its own baseline
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["loss_agreement"]["worst"] <= 1e-4  # fp32: both strategies follow one curve
    compared = report["strategies"]
    parameters = report["runs"][0]["parameters"]
    for measured in compared["measured"]:
        n = measured["world_size"]
        factor = {"ddp": 2, "fsdp": 3}[measured["parallel"]]  # fp32: all-reduce 2(n-1)/n, FSDP 3(n-1)/n
        assert measured["comm_mib"] == pytest.approx(factor * (n - 1) / n * 4 * parameters / 2**20)
    for pair in compared["side_by_side"]:  # each FSDP rank holds 1/N of DDP's state, and a few rows' rounding
        n = pair["world_size"]
        assert 1 / n <= pair["state_ratio"] <= 1 / n + 0.05, pair
    assert [pair["world_size"] for pair in compared["side_by_side"]] == [1, 2]
    text = (out / "report" / "report.md").read_text()
    assert "## DDP and FSDP" in text and "### Which strategy, for larger models" in text
    assert "DDP never fits" in text and "FSDP from" in text  # the 13B shape does not fit one 80 GB GPU under DDP


@pytest.mark.slow
def test_a_failed_size_is_named_with_its_log_and_left_out_of_the_report(tmp_path, corpus):
    out = tmp_path / "sweep"
    process = subprocess.Popen(
        sweep_command("--gpus", "1,2", "--executor", "local", "--out", out, f"data.path={corpus}",
                      "train.timeout_s=20", *SWEEP_TRAIN, "train.max_iters=1000", "train.eval_interval=500"),
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        # Local sizes run one at a time. Once the 2-rank run has its directory (its ranks have met),
        # find its rank 1 among the children of submitit's controller, whose pid is the job id and
        # names the job's log folder, and kill it as an out-of-memory killer would.
        deadline, victim = time.monotonic() + 120, None
        while victim is None and time.monotonic() < deadline and process.poll() is None:
            jobs = sorted((out / "submitit").glob("[0-9]*"), key=lambda p: p.stat().st_mtime)
            if (out / "n2").exists() and jobs:
                tasks = psutil.Process(int(jobs[-1].name)).children()
                victim = next((t for t in tasks if t.environ().get("SUBMITIT_LOCAL_GLOBALID") == "1"), None)
            time.sleep(0.2)
        assert victim is not None, "the 2-rank job never started"
        victim.send_signal(signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 1, stdout + stderr
    assert "sweep: job sweep-n2" in stderr and "failed" in stderr and "last lines of its log" in stderr
    assert stdout.splitlines()[-1] == f"report: {out}/report/report.md"
    assert [row["ranks"] for row in report_rows(out / "report" / "report.md")] == ["1"]
