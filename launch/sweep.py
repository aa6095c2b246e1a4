"""The same training at several sizes, profiled on every rank, then a scaling report.

    python launch/sweep.py --gpus 1,2,4                                  # config seed, strong scaling
    python launch/sweep.py --gpus 1,2,4 --config tiny train.max_iters=60
    python launch/sweep.py --gpus 1,2,4 --scaling weak --partition gpu
    python launch/sweep.py --gpus 1,2 --executor local --config tiny     # no Slurm needed
    python launch/sweep.py --gpus 1,2,4 --dry-run                        # print the plan, submit nothing
    python launch/sweep.py --gpus 1,2,4 --quantize                       # then quantize the 1-GPU run
    python launch/sweep.py --nodes 1,2 --gpus 2 --config tiny            # intra- vs inter-node
    python launch/sweep.py --gpus 1,2,4 --parallel ddp,fsdp              # DDP against FSDP at each size

One job per size through launch/submit.py (Slurm when a cluster answers, else local processes),
each with profile.cprofile=true and profile.sampler=true, into OUT/n<ranks>. --gpus counts GPUs per
node, as submit.py does: with --nodes N a size of G GPUs runs N x G ranks. --nodes also takes a
list: one job per (nodes, GPUs) pair, into OUT/n<ranks>-<nodes>x<gpus>; --parallel ddp,fsdp runs
each size with both strategies, into OUT/n<ranks>-ddp and OUT/n<ranks>-fsdp. Slurm jobs run side by
side (--sequential: one at a time); local ones always one at a time. While the jobs run, a
table shows each one's state, step and loss; then OUT/report/report.md (with report.json and the
plots) is written from the sizes that succeeded, and its path printed. A failed job is named,
with the tail of its log; the exit status is then 1.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

try:
    from launch.bootstrap import REPO, ensure_environment  # imported as launch.sweep
except ImportError:  # run as a script: python launch/sweep.py
    from bootstrap import REPO, ensure_environment
ensure_environment()

from gptcore.cli import ArgumentParser  # noqa: E402  (after the sys.path fix)
from gptcore.config import load_config  # noqa: E402
from gptcore.errors import GptcoreError, UserInputError  # noqa: E402
from gptcore.files import check_output  # noqa: E402
from launch import monitor  # noqa: E402

QUANTIZE_SBATCH = REPO / "slurm" / "quantize.sbatch"
PROFILE_OVERRIDES = ["profile.cprofile=true", "profile.sampler=true"]
POLL_S = 2.0
LOG_TAIL_LINES = 15


# -- the plan (pure) ------------------------------------------------------------------------------

def parse_sizes(text: str, flag: str = "--gpus") -> list[int]:
    """'1,2,4' -> [1, 2, 4]: positive, distinct integers (flag names the option in errors)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise UserInputError(f"{flag} {text!r} must be a comma-separated list of whole numbers, e.g. {flag} 1,2,4")
    sizes = [int(part) for part in parts]
    if min(sizes) < 1:
        raise UserInputError(f"{flag} {text!r}: every value must be at least 1")
    if len(set(sizes)) != len(sizes):
        raise UserInputError(f"{flag} {text!r} repeats a value; list each once")
    return sorted(sizes)


def gres_gpus(gres: str) -> int:
    """GPUs in a Slurm Gres string: 'gpu:4', 'gpu:a100:4(S:0-1)', 'gpu:2,mps:200', '(null)'."""
    total = 0
    for entry in re.sub(r"\([^)]*\)", "", gres).split(","):
        fields = entry.strip().split(":")
        if fields[0] == "gpu" and len(fields) >= 2 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def check_capacity(sizes: list[int], nodes: int, partition: str, node_caps: list[tuple[int, int]]) -> None:
    """Every size must fit the partition: `nodes` nodes, each with that many GPUs and at least
    one CPU per rank. node_caps: (cpus, gpus) per node of the partition."""
    if not node_caps:
        raise UserInputError(f"partition {partition} has no nodes; pick another with --partition (see `sinfo`)")
    if nodes > len(node_caps):
        raise UserInputError(f"--nodes {nodes} is more than partition {partition}'s {len(node_caps)} node(s)")
    for gpus in sizes:
        fitting = sum(1 for cpus, have in node_caps if have >= gpus and cpus >= gpus)
        if fitting < nodes:
            most = max(have for _, have in node_caps)
            raise UserInputError(
                f"--gpus {gpus} asks for {gpus} GPUs per node but partition {partition} has "
                f"{'at most ' + str(most) if most else 'no'} GPUs per node"
                f"{'' if nodes == 1 else f' on {nodes} nodes'}; use sizes up to {most} or another --partition")


@dataclass
class Planned:
    name: str
    gpus: int  # per node
    nodes: int
    out_dir: Path
    overrides: list[str]
    job: object = None  # submitit.Job once submitted
    outcome: str = ""  # "" while running, else "done" or the failure
    submitted_at: float = 0.0
    ended_at: float | None = None

    @property
    def ranks(self) -> int:
        return self.gpus * self.nodes


def parse_strategies(text: str) -> list[str]:
    """'ddp,fsdp' -> ['ddp', 'fsdp']: known strategies, each once, in the given order."""
    from gptcore.cluster.parallel import STRATEGIES

    names = [part.strip() for part in text.split(",")]
    if unknown := [name for name in names if name not in STRATEGIES]:
        raise UserInputError(f"--parallel {text!r}: {unknown[0]!r} is not a strategy; use {' or '.join(STRATEGIES)}, "
                             "comma-separated: --parallel ddp,fsdp")
    if len(set(names)) != len(names):
        raise UserInputError(f"--parallel {text!r} repeats a strategy; list each once")
    return names


def run_name(nodes: int, gpus: int, several_node_counts: bool, repeat: int = 0, strategy: str = "") -> str:
    """n<ranks>, or n<ranks>-<nodes>x<gpus> when the sweep has several node counts (2 ranks can
    then be 1 node x 2 GPUs or 2 nodes x 1 GPU); -<strategy> when it has several; -r<k> for the
    k-th of several repeats."""
    name = f"n{nodes * gpus}-{nodes}x{gpus}" if several_node_counts else f"n{nodes * gpus}"
    name = f"{name}-{strategy}" if strategy else name
    return f"{name}-r{repeat}" if repeat else name


def plan(config: str, overrides: list[str], sizes: list[int], node_counts: list[int], root: Path,
         scaling: str | None, repeats: int = 1, strategies: list[str] | None = None) -> list[Planned]:
    """One job per (nodes, GPUs per node) pair, the whole set `repeats` times, interleaved
    (1,2,4,1,2,4: drifting load falls on every size alike); validates every job's config here,
    before anything is submitted. Every size gets the threads per rank of the largest one
    (train.cpu_ranks), as it gets one GPU per rank, so that sizes compare like with like."""
    from gptcore.config import batch_split

    keys = {item.partition("=")[0].strip() for item in overrides}
    if "out_dir" in keys:
        raise UserInputError("the sweep chooses each run's out_dir; give --out DIR instead of out_dir=")
    if strategies and "train.parallel" in keys:
        raise UserInputError("--parallel chooses each run's train.parallel; drop the train.parallel= override")
    threads = [] if keys & {"train.threads", "train.cpu_ranks"} else [f"train.cpu_ranks={max(sizes)}"]
    jobs = []
    for repeat in range(1, repeats + 1):
        for nodes in node_counts:
            for gpus in sizes:
                for strategy in strategies or [""]:
                    name = run_name(nodes, gpus, len(node_counts) > 1, repeat if repeats > 1 else 0,
                                    strategy if len(strategies or []) > 1 else "")
                    out_dir = root / name
                    if out_dir.exists() and any(out_dir.iterdir()):
                        raise UserInputError(f"{out_dir} already holds a run; choose another --out")
                    extra = [*PROFILE_OVERRIDES, *threads, *overrides, *([f"train.scaling={scaling}"] if scaling else []),
                             *([f"train.parallel={strategy}"] if strategy else []), f"out_dir={out_dir}"]
                    batch_split(load_config(config, extra), gpus * nodes)
                    jobs.append(Planned(f"sweep-{name}", gpus, nodes, out_dir, extra))
    return jobs


# -- the cluster (side effects) -------------------------------------------------------------------

def slurm_nodes(partition: str | None) -> tuple[str, list[tuple[int, int]]]:
    """(partition name, [(cpus, gpus) per node]) from sinfo; the default partition when None."""
    result = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N|%P|%c|%G"],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise UserInputError(f"sinfo failed: {result.stderr.strip() or result.returncode}")
    rows = [line.split("|") for line in result.stdout.splitlines() if line.count("|") == 3]
    if partition is None:
        defaults = [part for _, part, _, _ in rows if part.endswith("*")]
        if not defaults:
            raise UserInputError("the cluster has no default partition; name one with --partition")
        partition = defaults[0]
    name = partition.rstrip("*")
    caps = {node: (int(cpus), gres_gpus(gres)) for node, part, cpus, gres in rows
            if part.rstrip("*") == name and cpus.isdigit()}
    return name, list(caps.values())


def chain_quantize(job_id: str, run_dir: Path, log_dir: Path) -> str:
    """slurm/quantize.sbatch on the 1-GPU run once its job succeeds; returns the new job id."""
    result = subprocess.run(
        ["sbatch", "--parsable", f"--dependency=afterok:{job_id}", f"--export=ALL,RUN_DIR={run_dir}",
         f"--output={log_dir}/quantize-%j.out", str(QUANTIZE_SBATCH)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise UserInputError(f"sbatch {QUANTIZE_SBATCH.name} failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def log_tail(job, lines: int = LOG_TAIL_LINES) -> str:
    """The end of rank 0's stderr (where tracebacks go), else of its stdout."""
    for read in (job.stderr, job.stdout):
        try:
            text = read()
        except OSError:
            text = None
        if text and text.strip():
            return "\n".join(text.strip().splitlines()[-lines:])
    return "(no log)"


def job_state(job) -> str:
    try:
        return job.state
    except Exception as err:  # noqa: BLE001  (the table must not die on an accounting hiccup)
        return f"? ({type(err).__name__})"


def status_rows(jobs: list[Planned], cluster: str) -> list[tuple[str, ...]]:
    """launch/monitor.py's row for each job: Slurm's own state, reason and elapsed time (a pending
    job shows `PENDING (Resources)` and no time run), or the local process's state; progress from
    the run's metrics."""
    known = monitor.query_jobs() if cluster == "slurm" and any(p.job is not None for p in jobs) else {}
    rows = []
    for planned in jobs:
        if planned.job is None:
            rows.append(("-", planned.name, "NOT SUBMITTED", "-", "-", "-", "-", "-"))
            continue
        job = known.get(str(planned.job.job_id))
        if job is None:
            elapsed = (planned.ended_at or time.monotonic()) - planned.submitted_at
            job = monitor.Job(str(planned.job.job_id), planned.name, job_state(planned.job), int(elapsed), str(REPO))
        rows.append(monitor.build_row(job, monitor.read_progress(planned.out_dir)))
    return rows


class StatusBoard:
    """Redraws the table in place on a terminal; in a log, prints it when it changes (at most
    every 15 s, or at once when a job changes state)."""

    def __init__(self, cluster: str, stream=sys.stdout):
        self.cluster = cluster
        self.stream = stream
        self.live = stream.isatty()
        self.drawn_lines, self.last_text, self.last_states, self.last_print = 0, "", None, 0.0

    def show(self, jobs: list[Planned]) -> None:
        rows = status_rows(jobs, self.cluster)
        text = monitor.format_table(rows)
        states = [row[2] for row in rows]
        if self.live:
            if self.drawn_lines:
                self.stream.write(f"\x1b[{self.drawn_lines}F\x1b[J")
            self.stream.write(text + "\n")
            self.drawn_lines = text.count("\n") + 1
        elif text != self.last_text and (states != self.last_states or time.monotonic() - self.last_print > 15):
            self.stream.write(text + "\n\n")
            self.last_print = time.monotonic()
        self.stream.flush()
        self.last_text, self.last_states = text, states


def settle(planned: Planned) -> None:
    """Record how a finished job ended: its out_dir, or why it failed."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    from launch.submit import failure_line

    planned.ended_at = time.monotonic()
    try:
        planned.out_dir = Path(planned.job.result())
        planned.outcome = "done"
    except (FailedJobError, UncompletedJobError) as err:
        planned.outcome = f"failed: {failure_line(str(err))}"


def wait_for(jobs: list[Planned], board: StatusBoard, count: int) -> None:
    """Poll until the first `count` jobs have ended, showing every job."""
    while True:
        for planned in jobs[:count]:
            if planned.job is not None and not planned.outcome and planned.job.done():
                settle(planned)
        board.show(jobs)
        if all(planned.outcome for planned in jobs[:count]):
            return
        time.sleep(POLL_S)


# -- main -----------------------------------------------------------------------------------------

def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="sweep.py", description="Train at several sizes and write a scaling report.")
    parser.add_argument("--gpus", required=True, help="comma-separated GPUs per node, one job each: 1,2,4")
    parser.add_argument("--config", default="seed", help="preset name (seed, shakespeare_char, cpu, tiny) or YAML file")
    parser.add_argument("--scaling", choices=["strong", "weak"], default=None,
                        help="strong: fixed global batch; weak: fixed batch per rank (default: the config's)")
    parser.add_argument("--nodes", default="1",
                        help="comma-separated nodes per job, one job per (nodes, gpus) pair: 1,2 (ranks = nodes x gpus)")
    parser.add_argument("--executor", choices=["auto", "slurm", "local"], default="auto",
                        help="slurm, local (ranks on this machine), auto: slurm when a cluster answers")
    parser.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    parser.add_argument("--out", default=None, help="sweep directory (default runs/sweep-<date>-<time>)")
    parser.add_argument("--timeout-min", type=int, default=60, help="time limit of each job")
    parser.add_argument("--sequential", action="store_true",
                        help="run one size at a time, so that sizes sharing a node do not disturb each "
                             "other's timings (always so with the local executor)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every size this many times, interleaved (1,2,4,1,2,4,...); the report pools "
                             "them and its intervals narrow")
    parser.add_argument("--parallel", default=None,
                        help="comma-separated strategies to run at every size, each a job: ddp,fsdp (default: the "
                             "config's train.parallel); the report compares them")
    parser.add_argument("--dry-run", action="store_true", help="print what would be submitted and stop")
    parser.add_argument("--quantize", action="store_true",
                        help="chain slurm/quantize.sbatch after the 1-GPU job (afterok); Slurm only")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides for every size")
    return parser


def prepare(args) -> tuple[list[Planned], str, str | None, Path]:
    """Everything that can be checked before the first submission."""
    from launch.submit import pick_cluster

    sizes = parse_sizes(args.gpus)
    node_counts = parse_sizes(args.nodes, "--nodes")
    if args.timeout_min < 1:
        raise UserInputError(f"--timeout-min must be at least 1, got {args.timeout_min}")
    if args.repeats < 1:
        raise UserInputError(f"--repeats must be at least 1, got {args.repeats}")
    cluster = pick_cluster(args.executor)
    partition, args.cpus_per_task = args.partition, None
    if cluster == "slurm":
        partition, caps = slurm_nodes(args.partition)
        check_capacity(sizes, max(node_counts), partition, caps)
        # The same CPUs per rank at every size: the share of a node's CPUs at the largest one.
        args.cpus_per_task = max(1, min(cpus for cpus, _ in caps) // max(sizes))
    elif max(node_counts) > 1:
        raise UserInputError("the local executor runs on this machine only; use --nodes 1 or --executor slurm")
    root = check_output(Path(args.out or REPO / "runs" / f"sweep-{datetime.now():%Y%m%d-%H%M%S}").resolve(), "--out",
                        directory=True)
    jobs = plan(args.config, args.overrides, sizes, node_counts, root, args.scaling, args.repeats,
                parse_strategies(args.parallel) if args.parallel else None)
    if args.quantize:
        if cluster != "slurm":
            raise UserInputError("--quantize chains a Slurm job (slurm/quantize.sbatch); it needs --executor slurm")
        if not QUANTIZE_SBATCH.is_file():
            raise UserInputError(f"--quantize needs {QUANTIZE_SBATCH.relative_to(REPO)}, which is not in this checkout")
        if 1 not in sizes:
            raise UserInputError("--quantize quantizes the 1-GPU run; include 1 in --gpus")
    return jobs, cluster, partition, root


def print_plan(jobs: list[Planned], cluster: str, partition: str | None, root: Path, args) -> None:
    where = f"slurm, partition {partition}" if cluster == "slurm" else "local processes"
    print(f"would submit {len(jobs)} job(s) ({where}, --time {args.timeout_min} min):")
    for planned in jobs:
        print(f"  {planned.name}: {planned.gpus} GPU(s) x {planned.nodes} node(s) = {planned.ranks} rank(s): "
              f"gptcore train --config {args.config} {' '.join(planned.overrides)}")
    if args.quantize:
        print(f"  then: sbatch --dependency=afterok:<{jobs[0].name} job> "
              f"--export=ALL,RUN_DIR={jobs[0].out_dir} {QUANTIZE_SBATCH.relative_to(REPO)}")
    print(f"report: {root / 'report' / 'report.md'}")


def submit_one(planned: Planned, args, cluster: str, partition: str | None, root: Path) -> None:
    from launch.submit import submit

    planned.job = submit(args.config, planned.overrides, planned.gpus, planned.nodes, cluster,
                         root / "submitit", planned.name, args.timeout_min, partition,
                         cpus_per_task=args.cpus_per_task, comment=f"{monitor.RUN_DIR_COMMENT}{planned.out_dir}")
    planned.submitted_at = time.monotonic()


def cancel_unfinished(jobs: list[Planned]) -> None:
    for planned in jobs:
        if planned.job is not None and not planned.outcome:
            planned.job.cancel(check=False)


def run(args) -> int:
    jobs, cluster, partition, root = prepare(args)
    if args.dry_run:
        print_plan(jobs, cluster, partition, root, args)
        return 0
    board = StatusBoard(cluster)
    try:
        for index, planned in enumerate(jobs):
            submit_one(planned, args, cluster, partition, root)
            if args.quantize and planned is jobs[0]:  # 1 GPU on the fewest nodes
                quantize_id = chain_quantize(str(planned.job.job_id).split("_")[0], planned.out_dir, root)
                print(f"quantize job {quantize_id} runs after job {planned.job.job_id} succeeds: "
                      f"{planned.out_dir}/ckpt_<mode>.pt, log {root}/quantize-{quantize_id}.out", flush=True)
            if args.sequential or cluster == "local":  # local sizes would share this machine's CPUs
                wait_for(jobs, board, index + 1)
        wait_for(jobs, board, len(jobs))
    except (KeyboardInterrupt, GptcoreError) as err:
        cancel_unfinished(jobs)
        if isinstance(err, GptcoreError):
            raise
        print("sweep: interrupted; cancelled the unfinished jobs", file=sys.stderr)
        return 130
    return finish(jobs, root)


def finish(jobs: list[Planned], root: Path) -> int:
    from analysis.report import write_report
    from analysis.runs import load_run

    runs, failed = [], 0
    for planned in jobs:
        if planned.outcome == "done":
            try:
                runs.append(load_run(planned.out_dir))
                continue
            except UserInputError as err:
                planned.outcome = f"finished but unreadable: {err}"
        failed += 1
        print(f"sweep: job {planned.name} ({planned.job.job_id}, {planned.ranks} ranks) {planned.outcome}\n"
              f"--- last lines of its log ({planned.job.paths.stderr}) ---\n{log_tail(planned.job)}\n---",
              file=sys.stderr)
    if not runs:
        print("sweep: error: no size succeeded, so there is no report", file=sys.stderr)
        return 1
    path = write_report(runs, root / "report")
    print(f"report: {path}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run(build_parser().parse_intermixed_args(argv))
    except GptcoreError as err:
        print(f"sweep: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
