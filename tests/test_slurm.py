"""The sbatch templates, launch/submit.py and launch/monitor.py on the local Slurm cluster
(`bash env/local_slurm.sh start`): real jobs and ranks, the tiny config on the CPU. Jobs are
submitted from the repository root as a user would; their runs/ and logs/ files are removed
afterwards. Skipped when Slurm's clients are missing or the cluster is not up."""

import json
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
import torch

from conftest import (REPO, SWEEP_TRAIN, assert_one_line_error, job_info, paused, report_rows, run_metrics, sacct,
                      slurm_command, sweep, wait_until, wait_until_ended)
from gptcore.checkpointing.checkpoint import load


def local_cluster_env() -> dict | None:
    """The environment that points Slurm's clients at the local cluster, or None when it is not up."""
    if shutil.which("sbatch") is None:
        return None
    try:
        script = ["bash", "env/local_slurm.sh"]
        if subprocess.run([*script, "status"], cwd=REPO, capture_output=True, timeout=60).returncode != 0:
            return None
        exports = subprocess.run([*script, "env"], cwd=REPO, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    conf = next((line.split("=", 1)[1] for line in exports.splitlines() if line.startswith("export SLURM_CONF=")), None)
    return {**os.environ, "OMP_NUM_THREADS": "1", **({"SLURM_CONF": conf} if conf else {})}


ENV = local_cluster_env()
pytestmark = [pytest.mark.skipif(ENV is None, reason="no local Slurm cluster (`bash env/local_slurm.sh start`)"),
              pytest.mark.slow, pytest.mark.slurm_cluster("one-node")]

# A tiny run that lasts ~5 s on two ranks (a signal sent at step 50 to 150 catches it mid-way).
LONG_STEPS = 500
LONG = [f"train.max_iters={LONG_STEPS}", "train.log_interval=50", "train.eval_interval=250"]
SHORTER_STEPS = 400  # FSDP's steps take longer
SHORTER = [f"train.max_iters={SHORTER_STEPS}", "train.log_interval=50", f"train.eval_interval={SHORTER_STEPS}"]


def run(*args, timeout=30, env=None) -> str:
    return slurm_command({**ENV, **(env or {})}, *args, timeout=timeout)


class Jobs:
    """Submits jobs from the repository root and cleans up after them."""

    def __init__(self):
        self.submitted = []  # (job id, job name)

    def sbatch(self, *args, env=None) -> str:
        job_name = next(a.split("=", 1)[1] for a in args if str(a).startswith("--job-name="))
        # The templates ask GPU nodes' 8 CPUs per rank; the local cluster's 2 cores advertise 8 in all.
        cpus = [] if any(str(a).startswith("--cpus-per-task") for a in args) else ["--cpus-per-task=2"]
        out = run("sbatch", "--parsable", *cpus, *args, env=env)
        job_id = out.strip().split(";")[0]
        self.submitted.append((job_id, job_name))
        return job_id

    def track(self, job_id, job_name):
        self.submitted.append((job_id, job_name))

    def cleanup(self):
        for job_id, job_name in self.submitted:
            subprocess.run(["scancel", job_id], capture_output=True, timeout=30, env=ENV)
            shutil.rmtree(REPO / "runs" / f"{job_name}-{job_id}", ignore_errors=True)
            (REPO / "logs" / f"{job_name}-{job_id}.out").unlink(missing_ok=True)


@pytest.fixture
def jobs():
    tracker = Jobs()
    yield tracker
    tracker.cleanup()


def log_text(job_name, job_id) -> str:
    path = REPO / "logs" / f"{job_name}-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def monitor_once() -> str:
    return run(sys.executable, "launch/monitor.py", "--once")


def monitor_row(table, job_id) -> list[str]:
    return next(line.split() for line in table.splitlines() if line.split()[:1] == [job_id])


def test_four_rank_template_completes_and_quantize_runs_after_it(jobs, corpus):
    train = jobs.sbatch("--job-name=test-4gpu", "slurm/train_4gpu.sbatch", f"data.path={corpus}",
                        env={"CONFIG": "tiny", "EXTRA": "train.device=cpu train.sample_tokens=0"})
    run_dir = REPO / "runs" / f"test-4gpu-{train}"
    # No group size given: int4's default 64 does not divide the tiny model's width, 32 is taken.
    quantize = jobs.sbatch("--job-name=test-quantize", f"--dependency=afterok:{train}",
                           f"--export=ALL,RUN_DIR=runs/test-4gpu-{train}", "slurm/quantize.sbatch")
    # Fine-tuning chains after pretraining the same way, from its checkpoint (the finetune preset).
    finetune = jobs.sbatch("--job-name=test-finetune", f"--dependency=afterok:{train}", "slurm/finetune.sbatch",
                           "train.device=cpu", "train.max_iters=10", "train.eval_interval=10", "train.eval_iters=2",
                           "train.sample_tokens=0", env={"INIT_FROM": f"runs/test-4gpu-{train}/ckpt.pt", "DATA": str(corpus)})
    assert wait_until_ended(ENV, train, 120) == "COMPLETED", log_text("test-4gpu", train)
    assert "world_size=4 launcher=srun device=cpu" in log_text("test-4gpu", train)
    assert sacct(ENV, train) == ["COMPLETED"]
    assert (run_dir / "ckpt.pt").is_file()
    steps = [r for r in run_metrics(run_dir) if "loss" in r]
    assert steps[-1]["step"] == 20 and {r["world_size"] for r in steps} == {4}

    row = monitor_row(monitor_once(), train)
    assert row[2] == "COMPLETED" and row[4] == "20/20" and float(row[5]) == pytest.approx(steps[-1]["loss"], abs=1e-4)

    assert wait_until_ended(ENV, quantize, 120) == "COMPLETED", log_text("test-quantize", quantize)
    assert (run_dir / "ckpt_int8.pt").is_file() and (run_dir / "ckpt_int4.pt").is_file()
    assert "int4: group size 32: the default 64 does not divide n_embd 32" in log_text("test-quantize", quantize)
    train_end, = sacct(ENV, train, "End")
    quantize_start, = sacct(ENV, quantize, "Start")
    assert quantize_start >= train_end  # ISO timestamps: the dependency held it back
    assert wait_until_ended(ENV, finetune, 120) == "COMPLETED", log_text("test-finetune", finetune)
    assert f"starting from the weights of runs/test-4gpu-{train}/ckpt.pt (2 layers x 32" in log_text("test-finetune", finetune)
    tuned = yaml.safe_load((REPO / "runs" / f"test-finetune-{finetune}" / "config.yaml").read_text())
    assert tuned["model"]["n_embd"] == 32 and tuned["model"]["dropout"] == 0.0 and tuned["train"]["lr"] == 3e-4


def test_fsdp_on_the_four_rank_template_shards_its_checkpoint_and_quantize_reads_it(jobs, corpus):
    env = {"CONFIG": "tiny", "EXTRA": "train.device=cpu train.sample_tokens=0 train.parallel=fsdp"}
    train = jobs.sbatch("--job-name=test-4fsdp", "slurm/train_4gpu.sbatch", f"data.path={corpus}", env=env)
    quantize = jobs.sbatch("--job-name=test-quantize", f"--dependency=afterok:{train}",
                           f"--export=ALL,RUN_DIR=runs/test-4fsdp-{train},MODES=int8", "slurm/quantize.sbatch")
    assert wait_until_ended(ENV, train, 120) == "COMPLETED", log_text("test-4fsdp", train)
    assert "world_size=4 launcher=srun device=cpu parallel=fsdp" in log_text("test-4fsdp", train)
    run_dir = REPO / "runs" / f"test-4fsdp-{train}"
    assert sorted(p.name for p in (run_dir / "ckpt-00000020").glob("*.distcp")) == [
        f"__{rank}_0.distcp" for rank in range(4)]
    assert wait_until_ended(ENV, quantize, 120) == "COMPLETED", log_text("test-quantize", quantize)
    assert (run_dir / "ckpt_int8.pt").is_file() and not (run_dir / "ckpt.pt").exists()


def cancelled_at(name: str, step: int, jobs, corpus, steps: list[str], env: dict) -> tuple[str, Path]:
    """A 2-rank job, scancelled (SIGTERM) once it has logged `step`: (its id, its run directory)."""
    job = jobs.sbatch(f"--job-name={name}", "slurm/train_2gpu.sbatch", f"data.path={corpus}", *steps, env=env)
    max_iters = next(item.split("=")[1] for item in steps if item.startswith("train.max_iters="))
    wait_until(lambda: f"step {step}/{max_iters}" in log_text(name, job), 90, f"step {step}")
    run("scancel", job)
    assert wait_until_ended(ENV, job, 90) == "CANCELLED"
    return job, REPO / "runs" / f"{name}-{job}"


def test_scancel_of_a_sharded_run_checkpoints_and_a_resubmission_resumes_it(jobs, corpus):
    """SIGTERM to a train.parallel=fsdp run (whose steps cost more collectives on a tiny model: fewer of them)."""
    env = {"CONFIG": "tiny", "EXTRA": "train.device=cpu train.sample_tokens=0 train.parallel=fsdp"}
    job, run_dir = cancelled_at("test-fsdp-cancel", 100, jobs, corpus, SHORTER, env)
    stopped = re.search(rf"stopped by SIGTERM at step (\d+)/{SHORTER_STEPS}: checkpoint (\S+) saved",
                        log_text("test-fsdp-cancel", job))
    assert stopped and stopped.group(2) == f"runs/test-fsdp-cancel-{job}/ckpt-{int(stopped.group(1)):08d}"
    again = jobs.sbatch("--job-name=test-fsdp-cancel", "slurm/train_2gpu.sbatch", f"data.path={corpus}", *SHORTER,
                        env={**env, "RUN_DIR": f"runs/test-fsdp-cancel-{job}"})
    assert wait_until_ended(ENV, again, 150) == "COMPLETED", log_text("test-fsdp-cancel", again)
    assert f"resumed from {stopped.group(2)} at step {stopped.group(1)}" in log_text("test-fsdp-cancel", again)
    logged = [r["step"] for r in run_metrics(run_dir) if "loss" in r]
    assert logged == sorted(set(logged)) and logged[-1] == SHORTER_STEPS  # none repeated
    assert [p.name for p in run_dir.glob("ckpt-*")] == [f"ckpt-{SHORTER_STEPS:08d}"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus) -> dict:
    """The final weights of the LONG run on 2 gloo ranks, uninterrupted (torchrun, not Slurm: the
    same ranks compute the same bits whichever launcher started them)."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "gptcore",
               "train", "--config", "tiny", "train.device=cpu", "train.sample_tokens=0", f"data.path={corpus}",
               *LONG, f"out_dir={run_dir}"]
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return load(run_dir / "ckpt.pt")["model"]


def training_pids(job) -> dict[int, str]:
    """The processes of the job's training step and their ranks (`scontrol listpids`: PID JOBID
    STEPID LOCALID GLOBALID)."""
    rows = [line.split() for line in run("scontrol", "listpids", job).splitlines()[1:]]
    return {int(pid): rank for pid, _, step, _, rank in rows if step == "0"}


def training_paused(job):
    """The training step's processes stopped meanwhile (conftest.paused)."""
    return paused(list(training_pids(job)), f"job {job}")


def same_model(run_dir, weights: dict) -> bool:
    saved = load(run_dir / "ckpt.pt")
    return saved["step"] == LONG_STEPS and all(torch.equal(saved["model"][name], weights[name]) for name in weights)


def test_usr1_requeues_and_a_late_sigterm_to_the_rerun_resumes_it_to_exactly_max_iters(jobs, corpus, straight):
    """USR1 checkpoints and requeues. A SIGTERM that then reaches the rerun's step alone, as one
    from the previous run's srun can (its step has the same id), stops it with a checkpoint, and
    the batch script, which no scancel has ended, resumes it."""
    job = jobs.sbatch("--job-name=test-preempt", "slurm/train_2gpu.sbatch", f"data.path={corpus}", *LONG,
                      "train.sample_tokens=0", env={"CONFIG": "tiny", "EXTRA": "train.device=cpu"})
    run_dir = REPO / "runs" / f"test-preempt-{job}"
    wait_until(lambda: f"step 50/{LONG_STEPS}" in log_text("test-preempt", job), 60, "the first logged step")
    with training_paused(job):  # each signal lands mid-run, not after the run's last step
        row = monitor_row(monitor_once(), job)
        assert row[2] == "RUNNING" and row[4].endswith(f"/{LONG_STEPS}")
        run("scancel", "--signal=USR1", job)
    wait_until(lambda: "resumed from" in log_text("test-preempt", job), 90, "the requeued run's resume")
    with training_paused(job):
        run("scancel", "--signal=TERM", job)  # the steps only, not the batch shell
    assert wait_until_ended(ENV, job, 150) == "COMPLETED", log_text("test-preempt", job)
    log = log_text("test-preempt", job)
    assert "stopped by SIGUSR1 at step" in log and f"requeued Slurm job {job}" in log
    assert "restart 1" in log and "resumed from" in log and "Traceback" not in log
    rerun = log[log.index("restart 1"):]
    assert "stopped by SIGTERM at step" in rerun and "resuming it (1 of 3)" in rerun, rerun
    assert job_info(ENV, job)["Restarts"] == "1" and sacct(ENV, job) == ["COMPLETED"]
    logged = [r["step"] for r in run_metrics(run_dir) if "loss" in r]
    assert logged == list(range(50, LONG_STEPS + 1, 50))  # every step once: none lost, none repeated
    assert same_model(run_dir, straight)
    assert not (run_dir / "stop.mark").exists()


def test_a_dead_rank_fails_the_whole_job_within_a_minute(jobs, corpus):
    job = jobs.sbatch("--job-name=test-deadrank", "slurm/train_2gpu.sbatch", f"data.path={corpus}",
                      "train.max_iters=1000000", "train.log_interval=50",
                      env={"CONFIG": "tiny", "EXTRA": "train.device=cpu"})
    wait_until(lambda: "step 50/" in log_text("test-deadrank", job), 60, "the first logged step")
    rank1 = min(pid for pid, rank in training_pids(job).items() if rank == "1")
    os.kill(rank1, 9)
    killed = time.monotonic()
    state = wait_until_ended(ENV, job, 60)
    assert state == "FAILED" and time.monotonic() - killed < 60


def test_multinode_template_starts_torchrun_per_node(jobs, corpus):
    job = jobs.sbatch("--job-name=test-torchrun", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2",
                      "slurm/train_multinode.sbatch", f"data.path={corpus}", "train.sample_tokens=0",
                      env={"CONFIG": "tiny", "LAUNCHER": "torchrun", "EXTRA": "train.device=cpu"})
    assert wait_until_ended(ENV, job, 120) == "COMPLETED", log_text("test-torchrun", job)
    assert "world_size=2 launcher=torchrun device=cpu" in log_text("test-torchrun", job)
    assert run_metrics(REPO / "runs" / f"test-torchrun-{job}")[-1]["step"] == 20


def test_submit_py_runs_two_tasks_on_the_cluster_through_a_preemption_and_a_late_sigterm(jobs, corpus, tmp_path,
                                                                                         straight):
    """USR2 checkpoints and submitit requeues. A SIGTERM that then reaches the rerun's step alone,
    as one from the previous run's srun can, stops it with a checkpoint, and the task resumes it in
    its own process, to the same weights as a straight run."""
    command = [sys.executable, "launch/submit.py", "--config", "tiny", "--gpus", "2", "--executor", "slurm",
               "--folder", str(tmp_path), "--job-name", "test-submit", f"data.path={corpus}", *LONG,
               "train.sample_tokens=0", "train.device=cpu"]
    with subprocess.Popen(command, cwd=REPO, env=ENV, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        try:
            first = process.stderr.readline()
            assert first.startswith("submitted job "), first
            job = first.split()[2].rstrip(";")
            jobs.track(job, "test-submit")
            rank0_log = tmp_path / job / f"{job}_0_log.out"
            wait_until(lambda: rank0_log.exists() and f"step 50/{LONG_STEPS}" in rank0_log.read_text(), 60,
                       "the first logged step")
            with training_paused(job):  # each signal lands mid-run, not after the run's last step
                run("scancel", "--signal=USR2", job)  # what Slurm sends submitit jobs before the time limit
            wait_until(lambda: "resumed from" in rank0_log.read_text(), 90, "the requeued run's resume")
            with training_paused(job):
                run("scancel", "--signal=TERM", job)  # the step only, not the batch shell
            out, err = process.communicate(timeout=150)
        finally:
            process.kill()
    assert process.returncode == 0, err
    run_dir = REPO / "runs" / f"test-submit-{job}"
    assert out.strip() == str(run_dir)
    log = rank0_log.read_text()
    assert "world_size=2 launcher=submitit" in log and "resumed from" in log
    rerun = log[log.index("resumed from"):]
    assert "stopped by SIGTERM at step" in rerun and "resuming it (1 of 3)" in rerun, rerun
    assert [r["step"] for r in run_metrics(run_dir) if "loss" in r] == list(range(50, LONG_STEPS + 1, 50))
    assert job_info(ENV, job)["Restarts"] == "1" and sacct(ENV, job) == ["COMPLETED"]
    assert same_model(run_dir, straight)


def test_scancel_stops_at_a_step_with_a_checkpoint_and_a_resubmission_ends_like_a_straight_run(jobs, corpus,
                                                                                               straight):
    """scancel sends SIGTERM (then SIGKILL after KillWait): the ranks agree on a step, rank 0
    checkpoints, and the log's last word is ours; the same RUN_DIR then continues to the end."""
    env = {"CONFIG": "tiny", "EXTRA": "train.device=cpu train.sample_tokens=0"}
    job, run_dir = cancelled_at("test-scancel", 150, jobs, corpus, LONG, env)
    # Slurm's own lines aside: srun's "forcing job termination" on the same SIGTERM may land after ours.
    ours = [line for line in log_text("test-scancel", job).splitlines()
            if line.strip() and "slurmstepd" not in line and not line.startswith("srun: ")]
    saved = load(run_dir / "ckpt.pt")["step"]
    assert ours[-1] == (f"stopped by SIGTERM at step {saved}/{LONG_STEPS}: checkpoint runs/test-scancel-{job}/ckpt.pt "
                        "saved; a rerun with resume=auto continues from it"), ours[-3:]
    logged = [r["step"] for r in run_metrics(run_dir) if "loss" in r]
    assert saved >= logged[-1] >= 150  # nothing trained after the last log line is lost
    assert "Traceback" not in log_text("test-scancel", job)

    again = jobs.sbatch("--job-name=test-scancel", "slurm/train_2gpu.sbatch", f"data.path={corpus}", *LONG,
                        env={**env, "RUN_DIR": f"runs/test-scancel-{job}"})
    assert wait_until_ended(ENV, again, 120) == "COMPLETED", log_text("test-scancel", again)
    assert f"resumed from runs/test-scancel-{job}/ckpt.pt at step {saved}" in log_text("test-scancel", again)
    assert same_model(run_dir, straight)


def test_scancel_of_a_torchrun_job_ends_without_a_traceback(jobs, corpus):
    job = jobs.sbatch("--job-name=test-tr-cancel", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2",
                      "slurm/train_multinode.sbatch", f"data.path={corpus}", *LONG,
                      env={"CONFIG": "tiny", "LAUNCHER": "torchrun", "EXTRA": "train.device=cpu train.sample_tokens=0"})
    wait_until(lambda: f"step 100/{LONG_STEPS}" in log_text("test-tr-cancel", job), 60, "step 100")
    run("scancel", job)
    assert wait_until_ended(ENV, job, 90) == "CANCELLED"
    log = log_text("test-tr-cancel", job)
    assert "stopped by SIGTERM at step" in log and "Traceback" not in log and "SignalException" not in log, log


def test_extra_overrides_are_never_glob_expanded(jobs):
    decoy = REPO / "train.lr=9"  # what `train.lr=*` would have matched
    decoy.write_text("")
    try:
        job = jobs.sbatch("--job-name=test-glob", "slurm/train_1gpu.sbatch",
                          env={"CONFIG": "tiny", "EXTRA": "train.device=cpu train.lr=*"})
        assert wait_until_ended(ENV, job, 60) == "FAILED"
    finally:
        decoy.unlink()
    assert "config key train.lr needs a number, got '*'" in log_text("test-glob", job)


def test_a_job_submitted_from_outside_the_repository_is_explained_by_the_monitor(jobs, tmp_path):
    """Slurm cannot open logs/ in the submit directory, so the job fails before the script runs
    and writes no log anywhere: the monitor names it, says why and how to submit it."""
    result = subprocess.run(["sbatch", "--parsable", "--job-name=gptcore-outside", str(REPO / "slurm/train_1gpu.sbatch")],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    job = result.stdout.strip().split(";")[0]
    jobs.track(job, "gptcore-outside")
    assert wait_until_ended(ENV, job, 60) == "FAILED"
    table = monitor_once()
    row = monitor_row(table, job)
    assert row[2:4] == ["FAILED", "(JobLaunchFailure)"]
    assert (f"job {job} (gptcore-outside) never started: Slurm could not open its log in {tmp_path}/logs/" in table
            and f"cd {REPO} && sbatch slurm/train_1gpu.sbatch" in table), table


def test_prepare_template_prepares_a_directory_as_a_cpu_job(jobs, tmp_path, corpus):
    books = tmp_path / "books"
    books.mkdir()
    text = corpus.read_text()
    (books / "one.txt").write_text(text[: len(text) // 2])
    (books / "two.txt").write_text(text[len(text) // 2:])
    out = tmp_path / "prepared"
    job = jobs.sbatch("--job-name=test-prepare", "--cpus-per-task=2", f"--export=ALL,DATA={books},OUT={out}",
                      "slurm/prepare.sbatch")
    assert wait_until_ended(ENV, job, 60) == "COMPLETED", log_text("test-prepare", job)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents_separated"] and meta["train_tokens"] + meta["val_tokens"] == len(text) + 2
    assert f"prepared {out}" in log_text("test-prepare", job)


# launch/sweep.py through Slurm.
def recomputed_step_ms(records: list[dict]) -> float:
    """The report's definition, worked out again here: median of the logged windows after the
    first one and the first 10% of steps, less each window's eval and checkpoint time."""
    steps = [r for r in records if "ms_per_step" in r]
    rows, previous = [], None
    for r in steps:
        extra = r["phases_ms"].get("eval", 0.0) + r["phases_ms"].get("checkpoint", 0.0)
        ms = r["ms_per_step"] - (extra / (r["step"] - previous) if previous is not None else 0.0)
        rows.append((r["step"], ms))
        previous = r["step"]
    cutoff = max(steps[0]["step"], 0.1 * steps[-1]["step"])
    return statistics.median(ms for step, ms in rows if step > cutoff)


def test_slurm_refuses_more_gpus_than_the_partition_has_and_plans_the_quantize_chain(tmp_path):
    out = tmp_path / "sweep"
    assert_one_line_error(sweep("--gpus", "1,64", "--config", "tiny", "--executor", "slurm", "--out", out,
                                env=ENV),
                          2, "--gpus 64", "GPUs per node")
    result = sweep("--gpus", "1,2", "--config", "tiny", "--executor", "slurm", "--quantize", "--dry-run", "--out", out,
                   env=ENV)
    assert result.returncode == 0, result.stderr
    assert f"sbatch --dependency=afterok:<sweep-n1 job> --export=ALL,RUN_DIR={out}/n1 slurm/quantize.sbatch" \
        in result.stdout
    assert not out.exists()


def test_slurm_sweep_one_two_four(tmp_path, corpus, fake_gpus):
    out = tmp_path / "sweep"
    result = sweep("--gpus", "1,2,4", "--executor", "slurm", "--timeout-min", 5, "--out", out,
                   f"data.path={corpus}", *SWEEP_TRAIN, env={**ENV, **fake_gpus}, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    report_dir = out / "report"
    assert result.stdout.splitlines()[-1] == f"report: {report_dir}/report.md"
    # The live table shows Slurm's own states, never ones made up by the sweep.
    states = {line.split()[2] for line in result.stdout.splitlines() if line.split()[1:2] and
              line.split()[1].startswith("sweep-n")}
    assert "COMPLETED" in states and not states & {"UNKNOWN", "DONE"}, result.stdout
    rows = report_rows(report_dir / "report.md")
    assert [row["ranks"] for row in rows] == ["1", "2", "4"]
    for name in ("speedup", "efficiency", "phases", "loss", "utilization"):
        assert (report_dir / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The report's numbers are the runs' own: recompute the 2-rank row from its metrics.jsonl.
    report = json.loads((report_dir / "report.json").read_text())
    one, two = (next(r for r in report["runs"] if r["world_size"] == n) for n in (1, 2))
    step_ms_1, step_ms_2 = recomputed_step_ms(run_metrics(out / "n1")), recomputed_step_ms(run_metrics(out / "n2"))
    assert two["step_ms"] == pytest.approx(step_ms_2)
    assert two["tokens_per_s"] == pytest.approx(8 * 32 * 1000 / step_ms_2)  # tiny: global batch 8 x 32
    assert two["efficiency"] == pytest.approx(step_ms_1 / (2 * step_ms_2))  # strong scaling
    assert rows[1]["step ms"] == f"{step_ms_2:.2f}"
    assert one["final_loss"] == pytest.approx(run_metrics(out / "n1")[-2]["loss"])

    # Every rank profiled; the merged top list is the training step, not imports.
    four = next(r for r in report["runs"] if r["world_size"] == 4)
    profiles = sorted((out / "n4" / "profile").glob("rank*.prof"))
    assert len(profiles) == four["profile_ranks"] == 4
    assert all(pstats.Stats(str(p)).total_calls > 0 for p in profiles)
    assert "train_step" in {f["function"] for f in four["profile_top"]}
    assert not any("importlib" in f["file"] for f in four["profile_top"])

    # Slurm gave each job its own GPUs (CUDA_VISIBLE_DEVICES): only those are sampled and reported.
    fake_util = {"0": 87.0, "1": 85.0, "2": 90.0, "3": 12.0}
    for run in report["runs"]:
        gpus = run["samples"]["node0"]["gpus"]
        assert len(gpus) == run["world_size"]
        assert all(gpu["util_pct"] == fake_util[index] for index, gpu in gpus.items())
        assert sorted(run["samples"]["node0"]["ranks"]) == [str(rank) for rank in range(run["world_size"])]
    index, gpu = sorted(two["samples"]["node0"]["gpus"].items())[0]
    assert f"gpu{index} {gpu['util_pct']:.0f}% / {gpu['mem_peak_mib']:,.0f} of 81,559 MiB" in \
        (report_dir / "report.md").read_text()
