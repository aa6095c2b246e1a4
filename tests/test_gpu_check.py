"""The GPU check as the device machine will run it, imitated on the CPU: a copy of the checkout with
only the carried folder beside it (no ../shared, no corpus cache, no network), every section in
smoke mode; and the defects of the CUDA paths that a CPU can show (a recompiling decode step, the
profiler's own sync counted as the loop's, orphaned section processes, [N/A] from nvidia-smi)."""

import json
import os
import shutil
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import REPO
from gptcore.config import ModelConfig
from gptcore.models.gpt import GPT
from gptcore.telemetry.metrics import read_metrics
from gptcore.telemetry.profiling import STEP_SPAN, host_syncs_per_step
from gptcore.telemetry.sampler import describe_gpu, parse_nvidia_smi

sys.path.insert(0, str(REPO / "bench"))
from gpu_check import QUICK_SECTIONS, SECTIONS, run_in_own_group  # noqa: E402

ALL_SECTIONS = tuple(SECTIONS)


def network_blocker() -> list[str]:
    """A command prefix that runs its command without any network but loopback (a network
    namespace of its own), where this machine allows one; else none."""
    for prefix in (["unshare", "-n"], ["unshare", "-rn"]):
        if shutil.which("unshare") and shutil.which("ip") and subprocess.run(
                [*prefix, "ip", "link", "set", "lo", "up"], capture_output=True).returncode == 0:
            return prefix
    return []


def device_like_copy(tmp_path, corpus):
    """What the device call sends: the checkout's tracked and not-ignored files, plus gpu_bundle/
    made by --prepare; in a folder with no shared/ beside it."""
    machine = tmp_path / "device"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = REPO / name
        if source.is_file():
            (machine / "repo" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, machine / "repo" / name)
    prepared = subprocess.run(["bash", "bench/gpu_check.sh", "--prepare", "--data", str(corpus)],
                              cwd=machine / "repo", capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHON": sys.executable})
    assert prepared.returncode == 0, prepared.stderr
    assert 'carry ["gpu_bundle"]' in prepared.stdout
    assert not (machine / "shared").exists()
    return machine / "repo"


@pytest.mark.slow
def test_the_check_runs_on_a_copy_like_the_device_machines_and_writes_the_table_as_it_goes(tmp_path, corpus):
    repo = device_like_copy(tmp_path, corpus)
    home, report = tmp_path / "home", tmp_path / "OUT"
    home.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "HOME": str(home), "GPTCORE_DATA": str(home / "nothing"),
           "OUT": str(report), "PIP_NO_INDEX": "1", "OMP_NUM_THREADS": "1"}
    command = ["bash", "-c", "ip link set lo up 2>/dev/null; exec bash bench/gpu_check.sh --smoke --out runs/check"]
    result = subprocess.run([*network_blocker(), *command], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=960)  # the smoke budget (900 s), and set-up
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((report / "gpu_check.json").read_text())
    by_section = {}
    for row in rows:
        by_section.setdefault(row["section"].split(" (")[0], []).append(row)
    assert tuple(by_section) == ALL_SECTIONS
    assert not [row for row in rows if row["ok"] is False], [row for row in rows if row["ok"] is False]
    checks = {row["check"]: row for row in rows}
    assert checks["two straight runs, deterministic"]["value"] == "bit-identical"
    assert checks["stopped at 20 + resumed vs straight"]["value"] == "bit-identical"
    assert by_section["gpu_to_cpu"][0]["value"] == "skipped: no CUDA (smoke runs on the CPU)"
    assert checks["int8 with --device auto"]["ok"] is True
    assert checks["DDP(compiled), 1-rank group"]["value"].startswith("backend gloo")
    assert checks["tiny FSDP vs DDP, 1 rank (eager)"]["value"].endswith("x)")
    assert checks["tiny FSDP compiled per block vs eager"]["ok"] is True
    for label in ("fp32 eager", "fp32 compiled", "bf16 eager", "bf16 compiled"):
        assert checks[f"tiny decode batch 1, {label}"]["value"].endswith("GB/s")
    assert any(check.startswith("tiny decode batch 1, int4 on the CPU") for check in checks)
    layout = next(row for check, row in checks.items() if check.endswith("column-major vs row-major weights"))
    assert layout["value"].endswith("x)") and " vs " in layout["value"]
    assert checks["tiny checkpoint (0 MB)"]["ok"] is True
    assert "ms/step" in checks["tiny + fast recipe, apart"]["value"]
    # The runs behind the rows are real, and trained on the carried text.
    metrics = read_metrics(repo / "runs" / "check" / "runs" / "train-compiled" / "metrics.jsonl")
    assert [r["step"] for r in metrics if "loss" in r][-1] == 40
    assert (repo / "runs" / "check" / "runs" / "train-compiled" / "data" / "meta.json").is_file()
    assert not list(home.rglob("*.txt"))  # no corpus fetched into the (empty) home
    # The table in $OUT is the one printed last; the log of failed sections is there, empty.
    assert (report / "gpu_check.md").read_text().strip() in result.stdout
    assert result.stdout.rstrip().splitlines()[-1] == f"gpu_check: table in {report / 'gpu_check.md'}"
    assert (report / "gpu_check.log").read_text().strip() == ""
    # A second check into the same runs directory is refused at once, before any section runs.
    again = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--out", "runs/check"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "holds an earlier check's runs" in again.stderr
    # So is a table that could not be written, rather than after the sections have run.
    refused = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--out", "runs/other", "--report",
                              str(repo / "README.md")], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stdout == "" and refused.stderr.strip() == (
        f"gpu_check: --report {repo / 'README.md'} is a file, not a directory; choose another --report")
    assert not (repo / "runs" / "other").exists()


def test_quick_mode_is_a_subset_and_the_budget_cuts_sections_it_cannot_fit(tmp_path, corpus):
    assert set(QUICK_SECTIONS) < set(SECTIONS)
    out, report = tmp_path / "check", tmp_path / "report"
    start = time.monotonic()
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", "--quick", "--only", "env,resume", "--budget",
                             "6", "--out", str(out), "--report", str(report), "--data", str(corpus)],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - start < 6 + 30  # the budget, the killed group's grace and start-up
    rows = json.loads((report / "gpu_check.json").read_text())
    assert rows[0]["section"].startswith("env")
    # resume (three trainings, more than 6 s on a CPU) gets what env left of 6 s: under 5 s it is
    # not started, else it is stopped at the budget's end, and the table says which.
    last = rows[-1]
    assert last["section"].startswith("resume")
    assert last["value"].startswith(("not run: the check's 6 s were spent", "timed out after"))


def test_a_section_that_times_out_takes_its_whole_process_group_with_it(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = f"sleep 300 & echo $! > {pid_file}; wait"
    start = time.monotonic()
    finished = run_in_own_group(["bash", "-c", script], tmp_path / "log", limit=2)
    assert not finished and time.monotonic() - start < 20
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(child) and psutil.Process(child).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the section's own child outlived its timeout"
        time.sleep(0.2)


def test_a_compiled_decode_step_is_compiled_once_for_any_length():
    """The warm-up generates fewer tokens than the timed run: the one-token step must not see a
    new input stride, and be recompiled, for each length."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=20, dropout=0.0)).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    short = model.generate(prompt, 16, temperature=0.0, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    long = model.generate(prompt, 40, temperature=0.0, compile=True)
    assert counters["stats"]["unique_graphs"] == graphs and not counters["recompiles"]
    assert torch.equal(long[:, :17], short) and torch.equal(long, model.generate(prompt, 40, temperature=0.0))


def test_host_syncs_are_counted_inside_the_steps_only(tmp_path, corpus):
    events = [{"name": STEP_SPAN, "cat": "user_annotation", "ts": 0, "dur": 100},
              {"name": STEP_SPAN, "cat": "gpu_user_annotation", "ts": 0, "dur": 100},
              {"name": STEP_SPAN, "cat": "user_annotation", "ts": 200, "dur": 100},
              {"name": "cudaStreamSynchronize", "ts": 250, "dur": 1},
              {"name": "cudaDeviceSynchronize", "ts": 400, "dur": 5}]  # the profiler's own, at its stop
    assert host_syncs_per_step(events) == 0.5
    assert host_syncs_per_step(events[:3] + events[4:]) == 0.0
    # A real trace holds one span per traced step.
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "gptcore", "train", "--config", "tiny", f"data.path={corpus}",
                             f"out_dir={run}", "train.sample_tokens=0", "profile.torch=true", "profile.torch_start=4",
                             "profile.torch_steps=3"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    trace = json.loads((run / "profile" / "trace_rank0.json").read_text())["traceEvents"]
    assert sum(1 for e in trace if e.get("name") == STEP_SPAN and e.get("cat") == "user_annotation") == 3


def test_nvidia_smi_fields_it_cannot_read_are_unknown_not_a_crash():
    (gpu,) = parse_nvidia_smi("0, [N/A], [N/A], [N/A], [N/A], 41\n")
    assert describe_gpu(gpu) == "gpu0 unknown MiB, unknown % busy, unknown W, 41 C"


def test_fsdp_compiles_each_block_and_leaves_the_root_eager():
    import torch.distributed as dist

    from gptcore.cluster import distributed
    from gptcore.cluster.parallel import parallelize

    distributed.init_process_group(distributed.RankContract(), torch.device("cpu"), 60, single_rank=True)
    try:
        model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=20, dropout=0.0))
        parallel = parallelize(model, torch.device("cpu"), "fsdp", compile_model=True)
        assert parallel.compute_model is model  # the root is not wrapped by torch.compile
        assert all(block._compiled_call_impl is not None for block in model.transformer.h)
        x = torch.randint(0, 20, (2, 8))
        _, loss = parallel.compute_model(x, x)
        loss.backward()
        assert torch.isfinite(loss)
    finally:
        dist.destroy_process_group()
