"""Data-parallel training with real ranks (torchrun, gloo on the CPU): N ranks compute what one rank
computes on the whole batch, a resumed N-rank run is bit-identical, and every launcher's
environment gives the right rank contract."""

import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, assert_one_line_error, run_metrics
from gptcore.checkpointing.checkpoint import gather_rng_states, restore_rng_state
from gptcore.cluster.distributed import RankContract, preflight, read_contract, thread_share
from gptcore.config import batch_split, load_config
from gptcore.errors import UserInputError

# 20 steps on the CPU (gloo) even on a GPU machine, a loss logged at every one of them.
TINY = ["--config", "tiny", "train.device=cpu", "train.log_interval=1", "train.sample_tokens=0"]


def train(ranks: int, *overrides: str) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command = [*(launcher if ranks > 1 else [sys.executable]), "-m", "gptcore", "train", *TINY, *overrides]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def losses(run_dir) -> list[float]:
    """Every logged loss in order, so that a step logged twice would show."""
    return [record["loss"] for record in run_metrics(run_dir) if "loss" in record]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("ddp") / "two"
    result = train(2, f"data.path={corpus}", f"out_dir={run_dir}")
    return run_dir, result.stdout


def test_two_ranks_follow_the_one_rank_loss_curve(two_ranks, tmp_path, corpus):
    run_dir, log = two_ranks
    assert "world_size=2 launcher=torchrun device=cpu" in log and "backend=gloo" in log
    # Strong scaling: the global batch of 8 is split 4 + 4 over the ranks.
    train(1, f"data.path={corpus}", f"out_dir={tmp_path / 'one'}")
    one, two = losses(tmp_path / "one"), losses(run_dir)
    assert len(one) == len(two) == 20
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-4, (one, two)


@pytest.mark.slow
def test_a_resumed_two_rank_run_with_dropout_is_bit_identical(tmp_path, corpus):
    """Each rank draws its own dropout masks: the checkpoint holds every rank's generator, and
    each rank gets its own back."""
    common = [f"data.path={corpus}", "model.dropout=0.1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(2, *common, f"out_dir={straight}")
    train(2, *common, f"out_dir={resumed}", "train.stop_at=10")
    assert len(losses(resumed)) == 10
    states = torch.load(resumed / "ckpt.pt", weights_only=True)["rng"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])
    log = train(2, *common, f"out_dir={resumed}", "resume=auto").stdout
    assert f"resumed from {resumed / 'ckpt.pt'} at step 10" in log
    assert losses(resumed) == losses(straight)
    a = torch.load(resumed / "ckpt.pt", weights_only=True)
    b = torch.load(straight / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 20 and a["world_size"] == 2
    assert all(torch.equal(a["model"][name], b["model"][name]) for name in b["model"])


def test_each_rank_restores_its_own_generator_and_a_new_rank_keeps_its_seed():
    cpu = torch.device("cpu")
    (own,) = gather_rng_states(cpu)  # one process: its own state only, no GPU entry on the CPU
    assert set(own) == {"torch"}
    torch.manual_seed(1)
    first = torch.get_rng_state()
    torch.manual_seed(2)
    states = [{"torch": torch.get_rng_state()}, {"torch": first, "cuda": torch.zeros(16, dtype=torch.uint8)}]
    assert restore_rng_state(states, 1, cpu) and torch.equal(torch.get_rng_state(), first)  # GPU state skipped
    torch.manual_seed(3)
    fresh = torch.get_rng_state()
    assert not restore_rng_state(states, 2, cpu)  # resumed on more ranks than were saved
    assert torch.equal(torch.get_rng_state(), fresh)


VOTE_SCRIPT = """
import sys
from gptcore.cluster import distributed
contract = distributed.read_contract()
distributed.init_process_group(contract, distributed.choose_device(contract), 60)
vote = distributed.LaggedVote()
# Only rank 1 votes (4, a reason's number), at the third call; every rank must learn it at the fourth.
votes = [vote(4 if contract.rank == 1 and call == 3 else 0) for call in range(6)]
sys.stdout.write(f"{contract.rank} {votes}\\n")  # one write: the ranks share the pipe
vote.close()
distributed.shutdown()
"""


def test_ranks_agree_on_a_vote_one_call_after_any_rank_cast_it():
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    result = subprocess.run([*launcher, "--no-python", sys.executable, "-c", VOTE_SCRIPT], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = str([0, 0, 0, 0, 4, 0])
    assert sorted(result.stdout.split("\n")[:2]) == [f"0 {expected}", f"1 {expected}"], result.stdout


def test_a_rank_that_loses_its_peer_fails_in_one_line_and_keeps_its_checkpoint(tmp_path, corpus):
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    command = [sys.executable, "-m", "gptcore", "train", *TINY, f"data.path={corpus}", f"out_dir={tmp_path / 'run'}",
               "train.max_iters=100000", "train.log_interval=100", "train.ckpt_interval=100"]
    survivor = subprocess.Popen(command, cwd=REPO, env={**env, "RANK": "0"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(command, cwd=REPO, env={**env, "RANK": "1"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for line in survivor.stdout:  # ends early if rank 0 exits
            if "step 300/" in line:
                break
        victim.kill()
        out, err = survivor.communicate(timeout=120)
    finally:
        for process in (survivor, victim):
            process.kill()
            process.wait()
    assert_one_line_error(subprocess.CompletedProcess(command, survivor.returncode, out, err), 1,
                          "rank 0 lost the other ranks", "resume=auto")
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] >= 200


def test_strong_scaling_splits_the_batch_and_weak_scaling_multiplies_it():
    strong = load_config("tiny", ["train.batch_size=8"])
    weak = load_config("tiny", ["train.batch_size=8", "train.scaling=weak"])
    assert batch_split(strong, 4) == (2, 8)
    assert batch_split(weak, 4) == (8, 32)
    with pytest.raises(UserInputError, match="multiple of 3"):
        batch_split(strong, 3)


def test_rank_contract_from_torchrun_submitit_and_srun():
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29511",
                "TORCHELASTIC_RUN_ID": "none"}
    assert read_contract(torchrun) == RankContract(3, 4, 1, "node1", 29511, "torchrun")
    by_hand = {name: value for name, value in torchrun.items() if name != "TORCHELASTIC_RUN_ID"}
    assert read_contract(by_hand).launcher == "env"
    # What submitit's TorchDistributedEnvironment().export() leaves in a task's environment.
    assert read_contract({**torchrun, "SUBMITIT_EXECUTOR": "slurm"}).launcher == "submitit"
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
            "SLURM_JOB_NODELIST": "node[1-2]", "MASTER_ADDR": "node1"}
    assert read_contract(srun) == RankContract(5, 8, 1, "node1", 20000 + 1234, "srun")
    # The batch shell of a 4-task job is one process: no step, no process group.
    batch_shell = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "1234"}
    assert read_contract(batch_shell) == RankContract()
    with pytest.raises(UserInputError, match="SLURM_PROCID"):
        read_contract({**srun, "SLURM_PROCID": "x"})


@pytest.mark.parametrize("change, fragment", [
    ({"MASTER_PORT": "abc"}, "MASTER_PORT='abc' is not an integer"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ({"RANK": "2"}, "RANK=2 is not a rank of WORLD_SIZE=2"),
    ({"RANK": "-1"}, "RANK=-1 is not a rank"),
    ({"WORLD_SIZE": "0", "RANK": "0"}, "at least one rank"),
])
def test_a_rank_contract_that_could_only_hang_is_refused(change, fragment):
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", **change}
    with pytest.raises(UserInputError, match=re.escape(fragment)):
        read_contract(env)


def test_preflight_finds_what_would_hang_before_the_ranks_meet():
    srun = RankContract(0, 4, 0, "node1", 29500, "srun")
    env = {"SLURM_STEP_TASKS_PER_NODE": "4(x1)", "SLURM_JOB_NUM_NODES": "1"}
    with pytest.raises(UserInputError, match="4 ranks on .* but 2 GPU"):
        preflight(srun, env, cuda_devices=2)
    preflight(srun, {**env, "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}, cuda_devices=2)
    two_nodes = {"SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_NUM_NODES": "2"}
    with pytest.raises(UserInputError, match="resolves to the loopback address 127.0.0.1 .* cannot reach"):
        preflight(RankContract(1, 2, 0, "localhost", 29500, "srun"), two_nodes)
    with socket.socket() as taken:  # rank 0 of an srun job will listen on the master port
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserInputError, match=f"MASTER_PORT {port} is already in use"):
            preflight(RankContract(0, 2, 0, "127.0.0.1", port, "srun"), {})
        preflight(RankContract(1, 2, 0, "127.0.0.1", port, "srun"), {})  # only rank 0 listens
        preflight(RankContract(0, 2, 0, "127.0.0.1", port, "torchrun"), {})  # torchrun's agent owns it


def test_one_thread_rule_for_every_launcher():
    two = RankContract(0, 2, 0, "127.0.0.1", 29500, "env")
    local = {"LOCAL_WORLD_SIZE": "2"}  # torchrun and submitit say how many ranks share the node
    # Explicit wins: train.threads, then OMP_NUM_THREADS (torchrun sets 1, users set their own).
    assert thread_share(3, 0, two, {**local, "OMP_NUM_THREADS": "5"}, 2, 2).count == 3
    assert thread_share(0, 0, two, {**local, "OMP_NUM_THREADS": "5"}, 2, 2).source == "OMP_NUM_THREADS"
    # Every rank may use the whole node: the CPUs are split among the ranks on it.
    assert thread_share(0, 0, two, local, 16, 16).count == 8
    assert thread_share(0, 0, two, local, 2, 2).count == 1
    assert thread_share(0, 0, RankContract(0, 4, 0, "h", 1, "env"), {"LOCAL_WORLD_SIZE": "4"}, 2, 2).count == 1
    # A narrower affinity mask is the rank's own (a scheduler bound it to its cores).
    assert thread_share(0, 0, two, local, 4, 16).count == 4
    # Slurm's allocation caps the share: --cpus-per-task, or the node's CPUs over its tasks; the
    # local test cluster advertises 8 CPUs on 2 real cores, and the real ones win.
    srun = RankContract(0, 4, 0, "h", 1, "srun")
    slurm = {"SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_CPUS_PER_TASK": "2"}
    assert thread_share(0, 0, srun, slurm, 64, 64).count == 2
    assert thread_share(0, 0, srun, slurm, 2, 2).count == 1
    assert thread_share(0, 0, srun, {"SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_CPUS_ON_NODE": "8"}, 64, 64).count == 2
    # A sweep holds threads per rank constant: its 1-rank run shares as if 4 ranks ran.
    alone = RankContract()
    assert thread_share(0, 0, alone, {}, 16, 16).count == 16
    assert thread_share(0, 4, alone, {}, 16, 16).count == 4
    share = thread_share(0, 4, alone, {}, 16, 16)
    assert (share.source, share.sharing_ranks, share.node_cpus) == ("share", 4, 16)


def test_the_lost_ranks_line_promises_a_resume_only_when_a_checkpoint_exists():
    from gptcore.cluster.distributed import lost_ranks

    err = RuntimeError("[gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:29500: Connection reset by peer. "
                       "Advice: ...")
    none = str(lost_ranks(err, 1, "no checkpoint was written", saved=False))
    assert "no checkpoint was written, and a rerun starts from step 0" in none and "continues" not in none
    assert "Read error [127.0.0.1]:29500: Connection reset by peer" in none
    kept = str(lost_ranks(err, 1, "runs/x/ckpt.pt (step 200) is kept", saved=True))
    assert kept.endswith("(step 200) is kept, and a rerun with resume=auto continues from it")


def test_the_openmp_wait_is_chosen_before_torch_and_a_users_choice_is_kept():
    from gptcore.cluster.spinning import BOUNDED_SPIN, set_wait_policy

    for command in ("sample", "eval", "prepare", "quantize"):  # never measured: a bounded spin
        environ = {}
        set_wait_policy(command, environ)
        assert environ == {"GOMP_SPINCOUNT": BOUNDED_SPIN}
    # A rank among several (its siblings' start-up is no load to measure), and one thread (no team).
    for unmeasured in ({"WORLD_SIZE": "2"}, {"OMP_NUM_THREADS": "1"}):
        set_wait_policy("train", unmeasured)
        assert unmeasured["GOMP_SPINCOUNT"] == BOUNDED_SPIN
    for chosen in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "INFINITE"}):
        environ = dict(chosen)
        set_wait_policy("train", environ)
        assert environ == chosen


def test_a_training_that_starts_on_a_busy_node_waits_passively():
    """As many CPU burners as the node has CPUs: the node is busy, so the training's threads sleep
    while they wait instead of spinning against the burners."""
    from gptcore.cluster.spinning import set_wait_policy

    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        environ = {}
        set_wait_policy("train", environ)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
