"""launch/submit.py with submitit's local executor: N ranks on this machine, no Slurm needed (the
same command against the Slurm cluster is in test_slurm.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_one_line_error, run_metrics
from gptcore.errors import UserInputError
from launch.submit import executor_parameters, resume_port


def submit(*args, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/submit.py", *map(str, args)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_two_local_ranks_train_into_a_run_dir_named_after_the_job(tmp_path, corpus):
    result = submit("--config", "tiny", "--gpus", 2, "--executor", "local", "--folder", tmp_path,
                    "--job-name", "test-submit-local", f"data.path={corpus}", "train.sample_tokens=0",
                    "train.device=cpu")
    assert result.returncode == 0, result.stdout + result.stderr
    out_dir = Path(result.stdout.strip().splitlines()[-1])
    try:
        job_id = out_dir.name.rpartition("-")[2]
        assert out_dir == REPO / "runs" / f"test-submit-local-{job_id}"
        records = run_metrics(out_dir)
        assert {r["world_size"] for r in records if "loss" in r} == {2}
        assert max(r["step"] for r in records if "step" in r) == 20 and (out_dir / "ckpt.pt").is_file()
        rank0_log = (tmp_path / job_id / f"{job_id}_0_log.out").read_text()
        assert "world_size=2 launcher=submitit device=cpu" in rank0_log
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def test_bad_input_is_refused_before_anything_is_submitted(tmp_path):
    assert_one_line_error(submit("--config", "nosuch", "--gpus", 1, "--executor", "local", "--folder", tmp_path),
                          2, "nosuch")
    assert_one_line_error(submit("--config", "tiny", "--gpus", 1, "--nodes", 2, "--executor", "local",
                                 "--folder", tmp_path), 2, "nodes=1")
    # argparse's own refusals are one line too, not its usage text.
    assert_one_line_error(submit("--config", "tiny", "--gpus", 0, "--folder", tmp_path), 2,
                          "submit: error: argument --gpus: must be at least 1, got 0 (see submit.py --help)")
    assert_one_line_error(submit("--gpus", 1, "--folder", tmp_path), 2, "required: --config")
    assert not any(tmp_path.iterdir())


def test_a_failing_run_ends_in_one_line_naming_the_cause(tmp_path):
    result = submit("--config", "tiny", "--gpus", 1, "--executor", "local", "--folder", tmp_path,
                    "--job-name", "test-submit-fail", "data.path=/nonexistent/book.txt")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("submit: job ") and "data file /nonexistent/book.txt does not exist" in last
    for run_dir in (REPO / "runs").glob("test-submit-fail-*"):
        shutil.rmtree(run_dir)


def test_both_executors_are_asked_for_one_gpu_per_task():
    """submitit's local executor sets each task's CUDA_VISIBLE_DEVICES from gpus_per_node (empty
    without it, which silently trained on the CPU of a GPU machine); Slurm allocates them."""
    local = executor_parameters("local", 2, 1, "job", 10, None, env={})
    assert local["gpus_per_node"] == 2 and local["tasks_per_node"] == 2 and "visible_gpus" not in local
    mine = executor_parameters("local", 2, 1, "job", 10, None, env={"CUDA_VISIBLE_DEVICES": "4,6,7"})
    assert mine["visible_gpus"] == (4, 6, 7)
    with pytest.raises(UserInputError, match="may use only 1 GPU"):
        executor_parameters("local", 2, 1, "job", 10, None, env={"CUDA_VISIBLE_DEVICES": "3"})
    slurm = executor_parameters("slurm", 4, 2, "job", 10, "gpu", env={"CUDA_VISIBLE_DEVICES": "3"})
    assert (slurm["gpus_per_node"], slurm["nodes"], slurm["slurm_partition"]) == (4, 2, "gpu")
    assert "visible_gpus" not in slurm


def test_every_rank_of_a_job_resumes_on_the_same_new_port():
    """A resume after a stray SIGTERM forms a second process group in the same processes; the
    ranks cannot talk before it exists, so each works out its port alone (the job on the Slurm
    cluster is in test_slurm.py)."""
    ports = [resume_port("4242", resume) for resume in (1, 2, 3)]
    assert ports == [resume_port("4242", resume) for resume in (1, 2, 3)]
    assert len(set(ports)) == 3 and all(20000 <= port <= 60000 for port in ports)
    assert resume_port("4243", 1) != ports[0]


@pytest.mark.slow
def test_each_local_rank_takes_its_share_of_the_cores(tmp_path, corpus):
    """submitit's local executor starts every rank with all the machine's cores in view: without
    a rule each would run a thread per core and they would fight over them."""
    env = {name: value for name, value in os.environ.items() if name != "OMP_NUM_THREADS"}
    result = subprocess.run([sys.executable, "launch/submit.py", "--config", "tiny", "--gpus", "2", "--executor",
                             "local", "--folder", str(tmp_path), "--job-name", "test-submit-threads",
                             f"data.path={corpus}", "train.device=cpu", "train.threads=0", "train.sample_tokens=0",
                             "train.max_iters=10"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    out_dir = Path(result.stdout.strip().splitlines()[-1])
    try:
        job_id = out_dir.name.rpartition("-")[2]
        threads = []
        for rank in (0, 1):
            log = (tmp_path / job_id / f"{job_id}_{rank}_log.out").read_text()
            line = next(line for line in log.splitlines() if line.startswith(f"rank {rank}/2 on "))
            threads.append(int(line.split(": ")[1].split()[0]))  # torch.get_num_threads() inside the rank
            assert "the share of" in line and "among 2 rank(s)" in line, line
        assert sum(threads) <= len(os.sched_getaffinity(0)), threads
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
