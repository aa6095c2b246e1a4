"""launch/monitor.py's pieces on real squeue/sacct text and real run directories (no Slurm needed;
the live table against the cluster is in test_slurm.py)."""

import json

from pathlib import Path

from launch.monitor import (Job, Progress, build_row, elapsed_seconds, find_run_dir, format_table, is_gptcore_job,
                            launch_failure, main, merge_jobs, parse_jobs, read_progress)

# `squeue --format=%i|%j|%T|%M|%Z|%r|%k|%o` and
# `sacct --parsable2 --format=JobID,JobName,State,Elapsed,WorkDir,Reason,Comment,SubmitLine`.
SQUEUE = """\
41|gptcore-4gpu|RUNNING|1:05|/work/main|None|(null)|/work/main/slurm/train_4gpu.sbatch
42|gptcore-quantize|PENDING|0:00|/work/main|Dependency|(null)|/work/main/slurm/quantize.sbatch
"""
SACCT = """\
39|gptcore-2gpu|COMPLETED|00:00:31|/work/main|None||sbatch slurm/train_2gpu.sbatch
40|gptcore-1gpu|CANCELLED by 0|01:02:03|/work/main|None||sbatch slurm/train_1gpu.sbatch
41|gptcore-4gpu|RUNNING|00:01:04|/work/main|None||sbatch slurm/train_4gpu.sbatch
"""


def test_elapsed_in_squeue_and_sacct_formats():
    assert [elapsed_seconds(t) for t in ("0:00", "1:05", "1:02:03", "01:02:03", "2-03:00:01")] == \
        [0, 65, 3723, 3723, 2 * 86400 + 3 * 3600 + 1]


def test_squeue_wins_over_sacct_and_states_are_one_word():
    jobs = merge_jobs(parse_jobs(SACCT), parse_jobs(SQUEUE))
    assert [(j.job_id, j.state, j.elapsed_s) for j in jobs] == [
        ("39", "COMPLETED", 31), ("40", "CANCELLED", 3723), ("41", "RUNNING", 65), ("42", "PENDING", 0)]
    assert [j.active for j in jobs] == [False, False, True, True]
    assert [j.shown_state for j in jobs] == ["COMPLETED", "CANCELLED", "RUNNING", "PENDING (Dependency)"]
    assert jobs[2].template() == "train_4gpu.sbatch" and jobs[2].run_dir is None


def write_run(run_dir, max_iters, records):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"out_dir: {run_dir}\ntrain:\n  max_iters: {max_iters}\n")
    lines = [json.dumps(record) for record in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3')  # a line being written


def test_progress_and_row_of_a_running_job(tmp_path):
    write_run(tmp_path / "gptcore-4gpu-41", 100, [
        {"step": 10, "loss": 3.5, "ms_per_step": 200.0, "tokens_per_s": 1000.0},
        {"step": 20, "loss": 3.25, "ms_per_step": 100.0, "tokens_per_s": 2500.0},
        {"step": 20, "eval": True, "train_loss": 3.2, "val_loss": 3.3},
    ])
    job = parse_jobs(SQUEUE)[0]
    progress = read_progress(find_run_dir(tmp_path, job))
    assert progress == Progress(step=20, total=100, loss=3.25, tokens_per_s=2500.0, ms_per_step=100.0)
    # 80 steps left at 100 ms each.
    assert build_row(job, progress) == ("41", "gptcore-4gpu", "RUNNING", "0:01:05", "20/100", "3.2500", "2,500", "0:00:08")


def test_finished_and_runless_jobs_show_what_is_known(tmp_path):
    write_run(tmp_path / "renamed-39", 50, [{"step": 50, "loss": 1.5, "ms_per_step": 9.0, "tokens_per_s": 9.0}])
    finished = Job("39", "gptcore-2gpu", "COMPLETED", 31, "/work/main")
    assert find_run_dir(tmp_path, finished) == tmp_path / "renamed-39"
    assert build_row(finished, read_progress(find_run_dir(tmp_path, finished)))[2:] == \
        ("COMPLETED", "0:00:31", "50/50", "1.5000", "9", "-")
    pending = Job("42", "gptcore-quantize", "PENDING", 0, "/work/main")
    assert find_run_dir(tmp_path, pending) is None
    table = format_table([build_row(pending, read_progress(None))])
    header, row = table.splitlines()
    assert header.split() == ["JOBID", "NAME", "STATE", "ELAPSED", "STEP", "LOSS", "TOK/S", "ETA"]
    assert row.split() == ["42", "gptcore-quantize", "PENDING", "0:00:00", "-", "-", "-", "-"]


def test_a_jobs_own_word_on_its_run_dir_finds_runs_outside_runs(tmp_path):
    elsewhere = tmp_path / "sweep" / "n2"
    write_run(elsewhere, 40, [{"step": 40, "loss": 2.5, "ms_per_step": 3.0, "tokens_per_s": 8.0}])
    job = Job("77", "sweep-n2", "COMPLETED", 12, "/home/u", comment=f"gptcore run_dir={elsewhere}")
    assert find_run_dir(tmp_path / "runs", job) == elsewhere
    assert read_progress(find_run_dir(tmp_path / "runs", job)).step == 40
    assert is_gptcore_job(job, Path("/work/main"), None)  # a sweep's job, submitted from anywhere


def test_a_job_slurm_could_not_start_says_why_and_how_to_fix_it(tmp_path):
    """Submitted from outside the repository: Slurm cannot open logs/ there, the job fails at
    launch and writes no log at all."""
    outside = tmp_path / "home"
    outside.mkdir()
    failed = Job("72", "gptcore-1gpu", "FAILED", 0, str(outside), "JobLaunchFailure", "",
                 "sbatch /work/main/slurm/train_1gpu.sbatch")
    assert is_gptcore_job(failed, Path("/work/main"), None)
    assert build_row(failed, Progress())[2] == "FAILED (JobLaunchFailure)"
    note = launch_failure(failed, Path("/work/main"))
    assert note == (f"job 72 (gptcore-1gpu) never started: Slurm could not open its log in {outside}/logs/ "
                    f"(submitted from {outside}, not the repository); submit from the root: cd /work/main && "
                    "sbatch slurm/train_1gpu.sbatch")
    # Slurm's clock may give such a job a second of elapsed time: the reason still says it never ran.
    late = Job("74", "gptcore-1gpu", "FAILED", 1, str(outside), "JobLaunchFailure", "",
               "sbatch /work/main/slurm/train_1gpu.sbatch")
    assert launch_failure(late, Path("/work/main")).startswith("job 74 (gptcore-1gpu) never started")
    ran = Job("73", "gptcore-1gpu", "FAILED", 30, "/work/main", "None", "", "sbatch slurm/train_1gpu.sbatch")
    assert launch_failure(ran, Path("/work/main")) is None  # it ran, and failed for its own reasons


def test_a_bad_option_is_one_line_not_usage_text(capsys):
    assert main(["--interval", "0"]) == 2
    assert capsys.readouterr() == ("", "monitor: error: argument --interval: must be more than 0 (see monitor.py "
                                       "--help)\n")
