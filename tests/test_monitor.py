"""launch/monitor.py's pieces on real squeue/sacct text and real run directories (no Slurm needed;
the live table against the cluster is in test_slurm.py)."""

import json

from launch.monitor import (Job, Progress, build_row, elapsed_seconds, find_run_dir, format_table,
                            merge_jobs, parse_jobs, read_progress)

# `squeue --format=%i|%j|%T|%M|%Z` and `sacct --parsable2 --format=JobID,JobName,State,Elapsed,WorkDir`.
SQUEUE = """\
41|gptcore-4gpu|RUNNING|1:05|/work/main
42|gptcore-quantize|PENDING|0:00|/work/main
"""
SACCT = """\
39|gptcore-2gpu|COMPLETED|00:00:31|/work/main
40|gptcore-1gpu|CANCELLED by 0|01:02:03|/work/main
41|gptcore-4gpu|RUNNING|00:01:04|/work/main
"""


def test_elapsed_in_squeue_and_sacct_formats():
    assert [elapsed_seconds(t) for t in ("0:00", "1:05", "1:02:03", "01:02:03", "2-03:00:01")] == \
        [0, 65, 3723, 3723, 2 * 86400 + 3 * 3600 + 1]


def test_squeue_wins_over_sacct_and_states_are_one_word():
    jobs = merge_jobs(parse_jobs(SACCT), parse_jobs(SQUEUE))
    assert [(j.job_id, j.state, j.elapsed_s) for j in jobs] == [
        ("39", "COMPLETED", 31), ("40", "CANCELLED", 3723), ("41", "RUNNING", 65), ("42", "PENDING", 0)]
    assert [j.active for j in jobs] == [False, False, True, True]


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
