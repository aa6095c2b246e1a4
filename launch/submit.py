"""Submit a training run through submitit: a Slurm job when a cluster answers, else local processes.

    python launch/submit.py --config tiny --gpus 2                       # waits, prints the out_dir
    python launch/submit.py --config seed --gpus 4 --nodes 2 --partition gpu train.max_iters=2000
    python launch/submit.py --config tiny --gpus 2 --executor local      # N ranks on this machine

From Python (e.g. a sweep):

    from launch.submit import submit
    job = submit("tiny", ["train.max_iters=50"], gpus=2)
    out_dir = job.result()

One task per GPU (tasks per node = gpus), each task one rank: submitit's
TorchDistributedEnvironment exports RANK/WORLD_SIZE/MASTER_ADDR for the trainer. The run goes to
runs/<job name>-<job id>/ unless out_dir=... is given. Preemption or the time limit: submitit
sends USR2, the trainer checkpoints at the next step boundary, and submitit requeues the job
with TrainTask.checkpoint(), which resumes from that checkpoint (resume=auto). A SIGTERM stops the
run with a checkpoint and no requeue, except a late one that reaches the requeued job's step from
its run before the requeue: the run resumes from it, as the sbatch templates' runs do.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

try:
    from launch.bootstrap import REPO, ensure_environment  # imported as launch.submit
except ImportError:  # run as a script: python launch/submit.py
    from bootstrap import REPO, ensure_environment
ensure_environment()

import cloudpickle  # noqa: E402  (after the sys.path fix)
import submitit  # noqa: E402

from gptcore.cli import ArgumentParser, at_least  # noqa: E402
from gptcore.config import load_config  # noqa: E402
from gptcore.errors import GptcoreError, UserInputError  # noqa: E402

RUNS = REPO / "runs"
EXECUTORS = ("auto", "slurm", "local")
STRAY_RESUMES = 3  # as many as slurm/common.sh allows a job


def resume_port(job_id: str, resume: int) -> int:
    """The process group's port for the job's resume number `resume` after a stray SIGTERM: the
    same on every rank, drawn from the job id as submitit draws the first one (in 20000-60000),
    so that jobs sharing a node rarely meet on a port."""
    return random.Random(f"{job_id} resume {resume}").randint(20000, 60000)


def run_dir(runs: Path, job_name: str, job_id: str) -> Path:
    """Where a job's run goes; the sbatch templates use the same runs/<name>-<id> layout."""
    return Path(runs) / f"{job_name}-{job_id}"


class TrainTask(submitit.helpers.Checkpointable):
    """One rank of a training run; every task of the job calls it. Its result is the out_dir."""

    def __init__(self, config: str, overrides: list[str], job_name: str, runs: str):
        self.config = config
        self.overrides = list(overrides)
        self.job_name = job_name
        self.runs = runs

    def __call__(self) -> str:
        from gptcore.cluster import preemption
        from gptcore.training.train import Trainer

        job_env = submitit.JobEnvironment()
        # overwrite: a job submitted from inside another job inherits that job's RANK etc.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        out_dir = run_dir(Path(self.runs), self.job_name, job_env.job_id)
        # The out_dir is fixed per job id and resume=auto, so a job requeued by Slurm (preemption,
        # node failure) continues the run whichever way it was requeued. submitit requeues, not
        # the trainer (train.requeue=false), so that it runs checkpoint() first.
        config = load_config(self.config, [f"out_dir={out_dir}", "resume=auto", "train.requeue=false",
                                           *self.overrides])
        result = Trainer(config).run()
        for resume in range(1, STRAY_RESUMES + 1):
            if not result.stray_sigterm:
                break
            # A late SIGTERM from this job's run before its requeue (preemption.stray_sigterm: rank 0
            # asked Slurm, every rank took its answer). A submitit job has one srun step, so the run
            # resumes in this process, in a second process group whose store listens on a port of
            # its own: the first one's can stay held until the process exits (pytorch/pytorch#62314).
            os.environ["MASTER_PORT"] = str(resume_port(job_env.job_id, resume))
            if job_env.global_rank == 0:
                print("gptcore: the training stopped on a SIGTERM that this job did not get (a late one from its "
                      f"run before the requeue); resuming it ({resume} of {STRAY_RESUMES})", flush=True)
            result = Trainer(config).run()
        if result.preempted and preemption.FLAG.requeues:
            # The trainer has saved a checkpoint at a step boundary and given submitit its handler
            # back; raising the signal again lets it call checkpoint() and requeue (rank 0 exits there).
            # A SIGTERM (scancel) stops the run without a requeue.
            signal.raise_signal(job_env._usr_sig())
        return str(result.out_dir)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or timeout: the same run, continued from its checkpoint."""
        return submitit.helpers.DelayedSubmission(
            TrainTask(self.config, [*self.overrides, "resume=auto"], self.job_name, self.runs))


# Jobs unpickle TrainTask by value: they need gptcore, not this checkout's launch/ on their path.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def slurm_answers(timeout_s: float = 15) -> bool:
    """True when Slurm's clients are installed and a controller replies."""
    try:
        return subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True,
                              timeout=timeout_s).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def pick_cluster(executor: str) -> str:
    if executor not in EXECUTORS:
        raise UserInputError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor == "auto":
        return "slurm" if slurm_answers() else "local"
    return executor


def visible_gpus(env=os.environ) -> tuple[int, ...]:
    """The GPUs this shell may use, from CUDA_VISIBLE_DEVICES when it lists indices; () for all."""
    parts = [part.strip() for part in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    return tuple(int(part) for part in parts) if parts and all(part.isdigit() for part in parts) else ()


def executor_parameters(cluster: str, gpus: int, nodes: int, job_name: str, timeout_min: int,
                        partition: str | None, env=os.environ, cpus_per_task: int | None = None,
                        comment: str | None = None) -> dict:
    """submitit parameters for one task per GPU. The GPU count goes to both executors: Slurm
    allocates them, and the local executor sets each task's CUDA_VISIBLE_DEVICES to that many of
    this shell's GPUs (without it, it sets it empty and the ranks train on the CPU)."""
    parameters = dict(name=job_name, timeout_min=timeout_min, nodes=nodes, tasks_per_node=gpus, gpus_per_node=gpus)
    if cluster == "slurm":
        parameters["slurm_partition"] = partition
        if cpus_per_task:
            parameters["cpus_per_task"] = cpus_per_task
        if comment:
            parameters["slurm_comment"] = comment
    elif visible := visible_gpus(env):
        if gpus > len(visible):
            raise UserInputError(f"--gpus {gpus} but this shell may use only {len(visible)} GPU(s) "
                                 f"(CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}); ask for at most {len(visible)}")
        parameters["visible_gpus"] = visible
    return parameters


def submit(config: str, overrides: list[str], gpus: int, nodes: int = 1, executor: str = "auto",
           folder: str | Path = "runs/submitit", job_name: str = "gptcore", timeout_min: int = 60,
           partition: str | None = None, cpus_per_task: int | None = None,
           comment: str | None = None) -> submitit.Job:
    """Submit `gptcore train --config CONFIG OVERRIDES...` on nodes x gpus ranks.

    Returns rank 0's task of the job: `.job_id` is the cluster's job id, `.result()` waits and
    returns the run's out_dir as a string (raising submitit's FailedJobError if the run failed),
    `.cancel()` cancels the whole job. Logs: FOLDER/<job id>/."""
    load_config(config, overrides)  # bad input fails here, not minutes later in the queue
    if gpus < 1 or nodes < 1:
        raise UserInputError(f"gpus and nodes must be at least 1, got gpus={gpus} nodes={nodes}")
    cluster = pick_cluster(executor)
    if cluster == "local" and nodes > 1:
        raise UserInputError("the local executor runs on this machine only; use nodes=1 or executor=slurm")
    ex = submitit.AutoExecutor(folder=Path(folder) / "%j", cluster=cluster)
    ex.update_parameters(**executor_parameters(cluster, gpus, nodes, job_name, timeout_min, partition,
                                               cpus_per_task=cpus_per_task, comment=comment))
    job = ex.submit(TrainTask(config, overrides, job_name, str(RUNS)))
    return job.task(0)


def failure_line(message: str) -> str:
    """One line out of submitit's error: the exception of a traceback (FailedJobError), or the
    job's state when it ended without a result (UncompletedJobError: cancelled, killed, timed out)."""
    if "with trace:" in message:
        blocks = [block for block in re.split(r"\n-{10,}\n", message) if block.strip()]
        if len(blocks) >= 2:
            return blocks[1].strip().splitlines()[-1][:300]
    state = re.search(r"has not produced any output \(state: ([^)\n]*)\)", message)
    if state:
        return f"ended without a result (state: {state.group(1)})"
    return message.strip().splitlines()[0][:300] if message.strip() else "no message"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="submit.py", description="Submit a gptcore training run through submitit and wait for it.")
    parser.add_argument("--config", required=True, help="preset name (seed, shakespeare_char, cpu, tiny) or YAML file")
    parser.add_argument("--gpus", type=at_least(1), required=True, help="GPUs per node = ranks per node")
    parser.add_argument("--nodes", type=at_least(1), default=1)
    parser.add_argument("--executor", choices=EXECUTORS, default="auto",
                        help="slurm, local (ranks on this machine), auto: slurm when a cluster answers")
    parser.add_argument("--folder", default="runs/submitit", help="submitit's logs and pickles (FOLDER/<job id>/)")
    parser.add_argument("--job-name", default="gptcore")
    parser.add_argument("--timeout-min", type=at_least(1), default=60)
    parser.add_argument("--partition", default=None)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_iters=100")
    try:
        args = parser.parse_args(argv)
        job = submit(args.config, args.overrides, args.gpus, args.nodes, args.executor, args.folder,
                     args.job_name, args.timeout_min, args.partition)
    except GptcoreError as err:
        print(f"submit: error: {err}", file=sys.stderr)
        return err.exit_code
    print(f"submitted job {job.job_id}; rank 0 log: {job.paths.stdout}", file=sys.stderr, flush=True)
    try:
        out_dir = job.result()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as err:
        print(f"submit: job {job.job_id} failed: {failure_line(str(err))}; logs: {job.paths.stderr}", file=sys.stderr)
        return 1
    print(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
