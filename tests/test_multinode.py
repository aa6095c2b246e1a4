"""slurm/train_multinode.sbatch across two nodes of a real Slurm cluster on this machine, one network
namespace per node (`bash env/local_slurm.sh start --nodes 2`; each node has its own hostname, address
and /etc/hosts, so ranks meet over the bridge as on separate machines). The tiny config on the CPU
over gloo, one rank per node. Skipped unless that cluster is up (`.ci/run` starts it)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import (REPO, assert_one_line_error, job_info, paused, run_metrics, run_gptcore, sacct, slurm_command,
                      step_losses, wait_until, wait_until_ended)

SCRIPT = ["bash", "env/local_slurm.sh"]
# One rank per node; no GPUs, so the test does not depend on the cluster's fake gres count.
TWO_NODES = ["-N", "2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=2"]
TINY = ["train.device=cpu", "train.sample_tokens=0"]
# Long enough (~6 s on two ranks) for a kill or a signal at step 200 to land mid-run, with checkpoints to resume from.
LONG_STEPS = 600
LONG = [f"train.max_iters={LONG_STEPS}", "train.log_interval=100", "train.ckpt_interval=100", "train.eval_interval=600"]


def netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10).returncode == 0


pytestmark = [pytest.mark.skipif(not netns_usable(), reason="needs root and `ip netns` for a multi-node cluster"),
              pytest.mark.slow, pytest.mark.slurm_cluster("two-nodes")]


@pytest.fixture(scope="module")
def slurm_env():
    """Client environment for the two-node cluster (SLURM_CONF points at its config). Started by
    `.ci/run` or by hand, never by the tests: plain pytest touches nothing outside the checkout."""
    def script(verb, timeout):
        return subprocess.run([*SCRIPT, verb, "--nodes", "2"], cwd=REPO, capture_output=True, text=True,
                              timeout=timeout)

    if script("status", 60).returncode != 0:
        pytest.skip("no two-node Slurm cluster up (`bash env/local_slurm.sh start --nodes 2`)")
    exports = script("env", 30).stdout
    conf = re.search(r"^export SLURM_CONF=(\S+)$", exports, re.M).group(1)
    return {**os.environ, "SLURM_CONF": conf, "OMP_NUM_THREADS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR"}


class Cluster:
    """Submits slurm/train_multinode.sbatch from the repository root, as a user would, with the run
    directory and the log under tmp_path; cancels whatever it submitted at the end."""

    def __init__(self, env: dict, tmp_path: Path):
        self.env, self.tmp_path, self.submitted = env, tmp_path, []

    def sbatch(self, launcher: str, run_dir: Path, *overrides, extra: str = "", env: dict | None = None) -> str:
        env = {**self.env, "LAUNCHER": launcher, "CONFIG": "tiny", "RUN_DIR": str(run_dir), "EXTRA": extra,
               **(env or {})}
        result = subprocess.run(
            ["sbatch", "--parsable", *TWO_NODES, f"--job-name=mn-{launcher}",
             f"--output={self.tmp_path}/%x-%j.out", "slurm/train_multinode.sbatch", *TINY, *map(str, overrides)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        job = result.stdout.strip().split(";")[0]
        self.submitted.append(job)
        return job

    def log(self, job: str) -> str:
        paths = list(self.tmp_path.glob(f"*-{job}.out"))
        return paths[0].read_text(errors="replace") if paths else ""

    def cancel_all(self):
        for job in self.submitted:
            subprocess.run(["scancel", job], env=self.env, capture_output=True, timeout=30)


@pytest.fixture
def cluster(slurm_env, tmp_path):
    jobs = Cluster(slurm_env, tmp_path)
    yield jobs
    jobs.cancel_all()


@pytest.fixture(scope="module")
def reference_loss(corpus, tmp_path_factory) -> float:
    """Loss at step 20 of a plain one-process run: under strong scaling the global batch is the
    same, so two ranks on two nodes must compute the same updates."""
    out_dir = tmp_path_factory.mktemp("one-node") / "run"
    result = run_gptcore("train", "--config", "tiny", f"data.path={corpus}", *TINY, f"out_dir={out_dir}",
                         timeout=120)
    assert result.returncode == 0, result.stderr
    return step_losses(out_dir)[20]


def rank_hosts(log: str) -> dict[int, str]:
    """{rank: hostname} from the line each rank prints when it joins: `rank R/N on HOST: T thread(s), ...`."""
    return {int(rank): host for rank, host in re.findall(r"^rank (\d+)/2 on (\S+?): \d+ thread", log, re.M)}


def tracebacks(log: str) -> list[str]:
    """The log's tracebacks, less the one torchrun's own race can log: the agent that hosts the
    rendezvous store may leave the exit barrier and close the store while another node's agent
    is still in it, which logs "Error waiting on exit barrier" and goes on (pytorch/pytorch#69520)."""
    race = "Error waiting on exit barrier" in log
    return [line for line in log.splitlines()
            if "Traceback" in line and not (race and "elastic/agent/server/api.py" in line)]


def checkpoint_step(run_dir: Path) -> int:
    """The step of a run's checkpoint: its ckpt.pt, or its newest sharded one (train.parallel=fsdp)."""
    from gptcore.checkpointing.checkpoint import load
    from gptcore.checkpointing.sharded import newest, read_run
    return load(run_dir / "ckpt.pt")["step"] if (run_dir / "ckpt.pt").exists() else read_run(newest(run_dir))["step"]


# Both launchers with DDP, and torchrun with FSDP (EXTRA="train.parallel=fsdp", as a user sets it).
LAUNCHES = [("srun", "ddp"), ("torchrun", "ddp"), ("torchrun", "fsdp")]
# FSDP's loss curve is checked against one rank's in test_fsdp.py: across two nodes its preemption test suffices.


def training_processes(job: str) -> dict[int, set[bytes]]:
    """{pid: environment} of JOB's processes that run gptcore (its ranks, and torchrun's agents),
    not srun; the PID namespace is shared with the nodes."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            environ = set((proc / "environ").read_bytes().split(b"\0"))
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if f"SLURM_JOB_ID={job}".encode() in environ and b"gptcore" in cmdline and b"srun" not in cmdline:
            found[int(proc.name)] = environ
    return found


def rank_pid(job: str, rank: int) -> int:
    """The training process of RANK in JOB (launched by srun: one process per rank)."""
    pids = [pid for pid, environ in training_processes(job).items() if f"SLURM_PROCID={rank}".encode() in environ]
    assert pids, f"no rank {rank} process of job {job}"
    return min(pids)


def training_paused(job: str):
    """JOB's training processes on both nodes stopped meanwhile (conftest.paused)."""
    return paused(list(training_processes(job)), f"job {job}")


@pytest.mark.parametrize("launcher, parallel", LAUNCHES[:2])
def test_two_nodes_train_like_one(cluster, corpus, tmp_path, reference_loss, launcher, parallel):
    run_dir = tmp_path / "run"
    # torchrun's ranks name their interface as docs/slurm.md shows for InfiniBand (here each node's eth0).
    interface = {"GLOO_SOCKET_IFNAME": "eth0"} if launcher == "torchrun" else {}
    job = cluster.sbatch(launcher, run_dir, f"data.path={corpus}", extra=f"train.parallel={parallel}", env=interface)
    assert wait_until_ended(cluster.env, job, 120) == "COMPLETED", cluster.log(job)
    log = cluster.log(job)
    assert f"world_size=2 launcher={launcher} device=cpu parallel={parallel}" in log
    assert sorted(rank_hosts(log).values()) == ["node1", "node2"], log
    assert sacct(cluster.env, job) == ["COMPLETED"]
    losses = step_losses(run_dir)
    assert max(losses) == 20
    assert losses[20] == pytest.approx(reference_loss, abs=1e-4)


def test_a_dead_rank_ends_the_job_and_a_resubmission_resumes(cluster, corpus, tmp_path):
    run_dir = tmp_path / "run"
    job = cluster.sbatch("srun", run_dir, f"data.path={corpus}", *LONG)
    wait_until(lambda: f"step 200/{LONG_STEPS}" in cluster.log(job), 90, "step 200")
    victim = rank_pid(job, 1)
    where = subprocess.run(["ip", "netns", "identify", str(victim)], capture_output=True, text=True, timeout=10)
    assert where.stdout.strip() == "mn-node2"
    os.kill(victim, 9)
    # srun --kill-on-bad-exit takes the surviving rank down: no wait on the process-group timeout.
    assert wait_until_ended(cluster.env, job, 60) == "FAILED", cluster.log(job)
    assert sacct(cluster.env, job) == ["FAILED"]
    saved = checkpoint_step(run_dir)
    assert 200 <= saved < LONG_STEPS

    again = cluster.sbatch("srun", run_dir, f"data.path={corpus}", *LONG)
    assert wait_until_ended(cluster.env, again, 120) == "COMPLETED", cluster.log(again)
    log = cluster.log(again)
    assert f"resumed from {run_dir / 'ckpt.pt'} at step {saved}" in log
    assert sorted(rank_hosts(log).values()) == ["node1", "node2"]
    assert max(step_losses(run_dir)) == LONG_STEPS and checkpoint_step(run_dir) == LONG_STEPS


def sruns_of(job: str) -> list[psutil.Process]:
    """This job's srun processes (on any node: the nodes share this machine's process table)."""
    found = []
    for process in psutil.process_iter(["name"]):
        try:
            if process.info["name"] == "srun" and process.environ().get("SLURM_JOB_ID") == job:
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_a_dead_node_requeues_the_job_which_resumes_when_the_node_returns(cluster, corpus, tmp_path):
    run_dir = tmp_path / "run"
    job = cluster.sbatch("srun", run_dir, f"data.path={corpus}", *LONG)
    wait_until(lambda: f"step 200/{LONG_STEPS}" in cluster.log(job), 90, "step 200")
    try:
        # node2 dies: its slurmd, the job's step daemon and its rank, all at once.
        pids = subprocess.run(["ip", "netns", "pids", "mn-node2"], capture_output=True, text=True, timeout=10)
        for pid in pids.stdout.split():
            os.kill(int(pid), signal.SIGKILL)
        # slurmctld stops hearing from node2, sets it DOWN and requeues the job (sbatch --requeue).
        wait_until(lambda: job_info(cluster.env, job)["JobState"] in {"PENDING", "REQUEUED"}, 60, "a requeue")
        # The first run's srun keeps trying to end its step on node2 for up to KillWait; the rerun's
        # step has the same id (JOB.0 again), so node2 returns once that srun is gone, as a
        # rebooted node would, much later, on a real cluster.
        wait_until(lambda: not sruns_of(job), 60, "the first run's srun to exit")
    finally:
        subprocess.run([*SCRIPT, "start", "--nodes", "2"], cwd=REPO, capture_output=True, timeout=120, check=True)
    assert wait_until_ended(cluster.env, job, 120) == "COMPLETED", cluster.log(job)
    log = cluster.log(job)
    # Slurm says why in one of two lines, whichever gets written before the first run is torn down:
    # srun's, or the batch step's.
    assert ("Node failure on node2" in log or "DUE TO NODE FAILURE" in log) and "restart 1" in log, log
    saved = int(re.search(rf"resumed from {re.escape(str(run_dir / 'ckpt.pt'))} at step (\d+)", log).group(1))
    assert 200 <= saved < LONG_STEPS
    assert max(step_losses(run_dir)) == LONG_STEPS and checkpoint_step(run_dir) == LONG_STEPS


# Each launcher once and each strategy once: torchrun with FSDP, srun with DDP (both launchers
# train DDP across the nodes in test_two_nodes_train_like_one).
@pytest.mark.parametrize("launcher, parallel", [LAUNCHES[0], LAUNCHES[2]])
def test_usr1_on_two_nodes_checkpoints_requeues_and_ends_at_exactly_max_iters(cluster, corpus, tmp_path, launcher,
                                                                             parallel):
    run_dir = tmp_path / "run"
    iters = LONG_STEPS if parallel == "ddp" else 400  # FSDP's steps are several collectives each over the bridge
    job = cluster.sbatch(launcher, run_dir, f"data.path={corpus}", *LONG, f"train.max_iters={iters}",
                         extra=f"train.parallel={parallel}")
    wait_until(lambda: f"step 200/{iters}" in cluster.log(job), 90, "step 200")
    with training_paused(job):  # the signal lands mid-run, not after the run's last step
        slurm_command(cluster.env, "scancel", "--signal=USR1", job)
    assert wait_until_ended(cluster.env, job, 150) == "COMPLETED", cluster.log(job)
    log = cluster.log(job)
    assert "stopped by SIGUSR1 at step" in log and f"requeued Slurm job {job}" in log
    assert "restart 1" in log and "resumed from" in log and not tracebacks(log), log
    assert job_info(cluster.env, job)["Restarts"] == "1" and sacct(cluster.env, job) == ["COMPLETED"]
    logged = [r["step"] for r in run_metrics(run_dir) if "loss" in r]
    assert logged == list(range(100, iters + 1, 100))  # every step once: none lost, none repeated
    assert checkpoint_step(run_dir) == iters


def test_sweep_across_one_and_two_nodes_reports_the_measured_link(cluster, corpus, tmp_path):
    out = tmp_path / "sweep"
    def sweep(*args, timeout=30):
        return subprocess.run([sys.executable, "launch/sweep.py", "--nodes", *map(str, args)], cwd=REPO,
                              env=cluster.env, capture_output=True, text=True, timeout=timeout)

    assert_one_line_error(sweep("1,3", "--gpus", "1", "--config", "tiny", "--out", out), 2, "--nodes 3", "2 node(s)")
    assert_one_line_error(sweep("0,2", "--gpus", "1", "--config", "tiny", "--out", out), 2, "--nodes '0,2'")
    result = sweep("1,2", "--gpus", "1", "--config", "tiny", "--executor", "slurm", "--timeout-min", 5, "--out",
                   out, f"data.path={corpus}", *TINY, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report" / "report.json").read_text())
    assert [(r["world_size"], r["nodes"], Path(r["path"]).name) for r in report["runs"]] == \
        [(1, 1, "n1-1x1"), (2, 2, "n2-2x1")]
    probes = [r for r in run_metrics(out / "n2-2x1") if r.get("probe") == "allreduce"]
    assert len(probes) == 1 and probes[0]["nodes"] == 2 and probes[0]["bytes"] == 4 * 2**20
    link = report["measured_link"]
    assert link["busbw_gbps"] == probes[0]["busbw_gbps"] > 0 and link["nodes"] == 2
    assert report["node_efficiency"]["inter_node"]["efficiency"] == report["runs"][1]["efficiency"]
    assert any(row["link"].startswith("measured here: 2 node(s)") for row in report["projection"]["rows"])
    markdown = (out / "report" / "report.md").read_text()
    assert f"Measured link: {link['busbw_gbps']:.3f} GB/s" in markdown
    nodes_table = markdown.split("## Within a node and across nodes")[1].split("\n\n")[1]
    assert [line.split("|")[1].strip() for line in nodes_table.splitlines()[2:]] == ["1", "2"]
