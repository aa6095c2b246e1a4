"""The squeue view of gptcore runs: one table of the user's gptcore jobs with their progress.

    python launch/monitor.py                  # refresh every 5 s until every job has ended
    python launch/monitor.py --once           # print the table once
    python launch/monitor.py --jobs 812,813 --since now-3days --interval 10

Jobs come from squeue (pending and running) and sacct (finished, when accounting is on), with
Slurm's own state and reason (`PENDING (Resources)`). A job is gptcore's when its name says so
(gptcore-*, sweep-*), it runs one of slurm/'s templates, it names its run directory in its
comment (`gptcore run_dir=PATH`, set by the templates and the sweep), it has a run directory in
runs/, or it was submitted from this checkout. Progress comes from that run directory's
metrics.jsonl (step, loss, tokens/s, ms/step) and config.yaml (the total steps). A job that
Slurm could not even start (JobLaunchFailure: most often submitted from outside the
repository, so that its logs/ directory did not exist) gets a line saying so and how to fix it.
"""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    from launch.bootstrap import REPO, ensure_environment  # imported as launch.monitor
except ImportError:  # run as a script: python launch/monitor.py
    from bootstrap import REPO, ensure_environment
ensure_environment()

import yaml  # noqa: E402  (once the environment is sure to have it)

from gptcore.cli import ArgumentParser, positive_number  # noqa: E402
from gptcore.errors import UserInputError  # noqa: E402

RUNS = REPO / "runs"
# squeue and sacct print the same fields in this order (see job_queries).
FIELDS = ("job_id", "name", "state", "elapsed", "workdir", "reason", "comment", "command")
RUN_DIR_COMMENT = "gptcore run_dir="
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT"}
COLUMNS = ("JOBID", "NAME", "STATE", "ELAPSED", "STEP", "LOSS", "TOK/S", "ETA")


@dataclass
class Job:
    job_id: str
    name: str
    state: str
    elapsed_s: int
    workdir: str
    reason: str = ""  # why it pends, or how it failed to start
    comment: str = ""
    command: str = ""  # the batch script (squeue) or the sbatch command line (sacct)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def shown_state(self) -> str:
        """Slurm's state with its reason where it explains one: PENDING (Resources)."""
        if self.reason and self.reason not in ("None", "(null)") and self.state in ("PENDING", "FAILED"):
            return f"{self.state} ({self.reason})"
        return self.state

    @property
    def run_dir(self) -> Path | None:
        """Where the job said its run is (its comment), if it did."""
        for part in self.comment.split(";"):
            if part.strip().startswith(RUN_DIR_COMMENT):
                return Path(part.strip()[len(RUN_DIR_COMMENT):])
        return None

    def template(self) -> str | None:
        """The slurm/ template the job runs, if it is one of gptcore's."""
        for word in self.command.split():
            if word.endswith(".sbatch") and Path(word).parent.name == "slurm":
                return Path(word).name
        return None


@dataclass
class Progress:
    step: int | None = None
    total: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    ms_per_step: float | None = None


# -- parsing Slurm's output (pure) ---------------------------------------------------------------

def elapsed_seconds(text: str) -> int:
    """squeue's `M:SS` / `H:MM:SS` / `D-HH:MM:SS` and sacct's `HH:MM:SS` as seconds."""
    days, _, clock = text.strip().rpartition("-")
    seconds = 0
    for part in clock.split(":"):
        seconds = seconds * 60 + int(part)
    return seconds + 86400 * int(days or 0)


def parse_jobs(text: str) -> list[Job]:
    """Lines of `id|name|state|elapsed|workdir|reason|comment|command` (squeue --format / sacct
    --parsable2) as Jobs. sacct writes `CANCELLED by 0`; the state is its first word. The command
    comes last, so a `|` inside it stays in it."""
    jobs = []
    for line in text.splitlines():
        parts = line.split("|", len(FIELDS) - 1)
        if len(parts) != len(FIELDS):
            continue
        job_id, name, state, elapsed, workdir, reason, comment, command = (part.strip() for part in parts)
        jobs.append(Job(job_id, name, state.split()[0] if state else "UNKNOWN",
                        elapsed_seconds(elapsed) if elapsed else 0, workdir, reason, comment, command))
    return jobs


def merge_jobs(finished: list[Job], queued: list[Job]) -> list[Job]:
    """sacct's jobs updated by squeue's (fresher for live jobs), oldest job first."""
    by_id = {job.job_id: job for job in finished}
    by_id.update({job.job_id: job for job in queued})
    return sorted(by_id.values(), key=lambda job: job_sort_key(job.job_id))


def job_sort_key(job_id: str) -> tuple:
    head, _, tail = job_id.partition("_")
    return (int(head) if head.isdigit() else 0, job_id)


# -- reading a run's files (pure apart from reading them) ----------------------------------------

def find_run_dir(runs: Path, job: Job) -> Path | None:
    """Where the job said its run is, else runs/<name>-<id>, or any runs/*-<id> (a name that
    Slurm shortened)."""
    if job.run_dir is not None:
        return job.run_dir
    exact = runs / f"{job.name}-{job.job_id}"
    if exact.is_dir():
        return exact
    return next((path for path in sorted(runs.glob(f"*-{job.job_id}")) if path.is_dir()), None)


def last_train_record(lines: list[str]) -> dict | None:
    """The newest step record of metrics.jsonl lines; eval records and a half-written line are skipped."""
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "loss" in record and not record.get("eval"):
            return record
    return None


def read_progress(run_dir: Path | None, tail_bytes: int = 65536) -> Progress:
    if run_dir is None:
        return Progress()
    progress = Progress()
    try:
        tree = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        progress.total = int(tree["train"]["max_iters"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        pass
    try:
        with open(run_dir / "metrics.jsonl", "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - tail_bytes))
            lines = handle.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return progress
    record = last_train_record(lines)
    if record:
        progress.step = record.get("step")
        progress.loss = record.get("loss")
        progress.tokens_per_s = record.get("tokens_per_s")
        progress.ms_per_step = record.get("ms_per_step")
    return progress


# -- the table (pure) ----------------------------------------------------------------------------

def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    clock = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock}" if days else clock


def build_row(job: Job, progress: Progress) -> tuple[str, ...]:
    step = "-"
    if progress.step is not None:
        step = f"{progress.step}/{progress.total}" if progress.total else str(progress.step)
    eta = "-"
    if job.state == "RUNNING" and None not in (progress.step, progress.total, progress.ms_per_step):
        eta = format_duration((progress.total - progress.step) * progress.ms_per_step / 1000)
    return (job.job_id, job.name, job.shown_state, format_duration(job.elapsed_s), step,
            f"{progress.loss:.4f}" if progress.loss is not None else "-",
            f"{progress.tokens_per_s:,.0f}" if progress.tokens_per_s is not None else "-", eta)


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(COLUMNS, *rows)]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [COLUMNS, *rows])


def is_gptcore_job(job: Job, repo: Path, run_dir: Path | None) -> bool:
    return (job.name.startswith(("gptcore", "sweep-")) or job.template() is not None or job.run_dir is not None
            or run_dir is not None or Path(job.workdir) == repo)


def launch_failure(job: Job, repo: Path) -> str | None:
    """Why a job of one of gptcore's templates never started, and the fix, in one line."""
    template = job.template()
    if job.state != "FAILED" or template is None:
        return None
    logs = Path(job.workdir) / "logs"
    # Slurm's JobLaunchFailure says it (the job may still show a second of elapsed time); without
    # that reason, a job that failed at once where no logs/ exists is the same case.
    if job.reason != "JobLaunchFailure" and (job.elapsed_s > 0 or logs.is_dir()):
        return None
    return (f"job {job.job_id} ({job.name}) never started: Slurm could not open its log in {logs}/ (submitted from "
            f"{job.workdir}, not the repository); submit from the root: cd {repo} && sbatch slurm/{template}")


# -- Slurm (side effects) ------------------------------------------------------------------------

def job_queries(since: str, user: str) -> tuple[list[str], list[str]]:
    # --states=all: a job that just ended is in squeue a few minutes before sacct has its record
    squeue = ["squeue", f"--user={user}", "--states=all", "--noheader", "--format=%i|%j|%T|%M|%Z|%r|%k|%o"]
    sacct = ["sacct", f"--user={user}", "--allocations", "--noheader", "--parsable2",
             "--format=JobID,JobName,State,Elapsed,WorkDir,Reason,Comment,SubmitLine", f"--starttime={since}"]
    return squeue, sacct


def run_query(command: list[str], required: bool) -> str:
    """The command's output; sacct without accounting fails, and then squeue alone has to do."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        failure = "not found; run this where Slurm's clients are installed"
    except subprocess.TimeoutExpired:
        failure = "did not answer in 30 s; is the Slurm controller up?"
    else:
        if result.returncode == 0:
            return result.stdout
        failure = f"failed: {(result.stderr.strip().splitlines() or ['no message'])[-1]}"
    if required:
        raise SystemExit(f"monitor: {command[0]} {failure}")
    return ""


def scontrol_reason(job_id: str) -> str:
    """Slurm's reason for a job it still holds in memory (sacct loses a launch failure's)."""
    out = run_query(["scontrol", "show", "job", "-o", job_id], required=False)
    return next((field.split("=", 1)[1] for field in out.split() if field.startswith("Reason=")), "")


def query_jobs(since: str = "now-1days") -> dict[str, Job]:
    """The user's jobs as Slurm knows them (squeue, then sacct), by job id."""
    squeue, sacct = job_queries(since, getpass.getuser())
    jobs = merge_jobs(parse_jobs(run_query(sacct, required=False)), parse_jobs(run_query(squeue, required=True)))
    return {job.job_id: job for job in jobs}


def collect(runs: Path, since: str, job_ids: set[str] | None) -> list[tuple[Job, Progress]]:
    jobs = list(query_jobs(since).values())
    found = []
    for job in jobs:
        if job_ids is not None and job.job_id not in job_ids:
            continue
        run_dir = find_run_dir(runs, job)
        if job_ids is not None or is_gptcore_job(job, REPO, run_dir):
            if job.state == "FAILED" and job.reason in ("", "None"):
                job.reason = scontrol_reason(job.job_id) or job.reason
            found.append((job, read_progress(run_dir)))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="monitor.py", description="Live table of gptcore's Slurm jobs and their training progress.")
    parser.add_argument("--once", action="store_true", help="print the table once and exit")
    parser.add_argument("--interval", type=positive_number, default=5.0, help="seconds between refreshes")
    parser.add_argument("--jobs", default=None, help="comma-separated job ids (default: all of the user's gptcore jobs)")
    parser.add_argument("--since", default="now-1days", help="oldest finished jobs shown (sacct --starttime)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where the run directories are")
    try:
        args = parser.parse_args(argv)
    except UserInputError as err:
        print(f"monitor: error: {err}", file=sys.stderr)
        return err.exit_code
    job_ids = {part.strip() for part in args.jobs.split(",") if part.strip()} if args.jobs else None
    live = not args.once and sys.stdout.isatty()
    while True:
        found = collect(args.runs, args.since, job_ids)
        table = format_table([build_row(job, progress) for job, progress in found]) if found else "no gptcore jobs"
        if live:
            print("\033[H\033[2J", end="")  # redraw in place
        print(f"{time.strftime('%H:%M:%S')}  {sum(job.active for job, _ in found)} active\n{table}", flush=True)
        for note in filter(None, (launch_failure(job, REPO) for job, _ in found)):
            print(note, flush=True)
        if args.once or not any(job.active for job, _ in found):
            return 0
        time.sleep(args.interval)
        if not live:
            print()


if __name__ == "__main__":
    sys.exit(main())
