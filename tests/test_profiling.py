"""Profiling a real 2-rank torchrun run: a cProfile per rank over the training loop only, phase
timers in the metrics, a torch.profiler trace, and the hardware sampler finding both ranks."""

import json
import os
import pstats
import statistics
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import psutil
import pytest

from analysis.runs import merged_profile, top_functions
from conftest import REPO, run_metrics
from gptcore.telemetry.profiling import STEP_SPAN, LoopProfiler, TorchProfilerWindow


@pytest.fixture(scope="module")
def profiled(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("profiled") / "run"
    # Only the venv's bin on PATH: no nvidia-smi, even on a machine that has one.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "gptcore", "train",
         "--config", "tiny", "train.device=cpu", f"data.path={corpus}", f"out_dir={run_dir}", "train.sample_tokens=0",
         "profile.cprofile=true", "profile.torch=true", "profile.torch_start=2", "profile.torch_steps=2",
         "profile.sampler=true", "profile.sampler_interval=0.2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir, result


def test_every_rank_has_a_loadable_profile_of_the_training_loop(profiled):
    run_dir, _ = profiled
    files = sorted((run_dir / "profile").glob("rank*.prof"))
    assert [f.name for f in files] == ["rank0.prof", "rank1.prof"]
    assert not [f.name for f in (run_dir / "profile").iterdir() if f.name.endswith(".tmp")]  # written atomically
    for f in files:
        assert pstats.Stats(str(f)).total_calls > 0
        assert "train_step" in f.with_suffix(".txt").read_text()
    top = top_functions(merged_profile(files), 25)
    names = {row["function"] for row in top}
    assert {"train_step", "backward", "forward"} <= names
    # Once per step on each rank, never counted as recursive (what Python 3.12's cProfile gets
    # wrong unaided: LoopProfiler's test below).
    assert [(primitive, total) for (_, _, name), (primitive, total, *_) in merged_profile(files).stats.items()
            if name == "train_step"] == [(40, 40)]
    # Profiling starts after set-up: no import machinery at the top, no evaluation, no sampling thread,
    # and not the torch.profiler window's own start and export.
    assert not any("importlib" in row["file"] for row in top)
    assert not any(name in ("evaluate", "_run", "sample", "export_chrome_trace")
                   for _, _, name in merged_profile(files).stats)


def test_the_loop_profile_holds_the_training_threads_calls_alone(tmp_path):
    """Python 3.12+'s cProfile, left alone, also counts other threads' calls and mistakes the return
    of a bound method around a C function (a pybind11 method) for a Python frame's."""
    stop = threading.Event()

    def side_work():
        return sum(range(100))

    def side_thread():
        while not stop.is_set():
            side_work()

    c_method = types.MethodType(dir, types.SimpleNamespace())

    def one_step():
        for _ in range(3):
            c_method()
        time.sleep(0.001)  # the side thread runs meanwhile

    thread = threading.Thread(target=side_thread, daemon=True)
    thread.start()
    profiler = LoopProfiler(tmp_path, rank=0, enabled=True)
    with profiler.active():
        for _ in range(20):
            one_step()
            with profiler.paused():
                side_work()
    stop.set()
    thread.join()
    profiler.dump()
    stats = pstats.Stats(str(tmp_path / "profile" / "rank0.prof")).stats
    calls = {name: (primitive, total) for (_, _, name), (primitive, total, *_) in stats.items()}
    assert calls["one_step"] == (20, 20)
    # Python 3.10 does not report a C function called through a bound method to profilers at all.
    assert calls.get("<built-in method builtins.dir>", (60, 60)) == (60, 60)
    assert "side_work" not in calls and "side_thread" not in calls


def test_the_torch_profiler_window_acts_on_its_own_steps_alone(tmp_path):
    """The loop pauses cProfile around the window's calls only where acts() says they do something."""
    window = TorchProfilerWindow(tmp_path, rank=0, start=2, steps=2, enabled=True)
    acted = []
    for step in range(6):
        before = window.acts(step)
        window.before_step(step)
        after = window.acts(step)
        window.after_step(step)
        acted.append((before, after))
    assert acted == [(False, False)] * 2 + [(True, True)] * 2 + [(False, False)] * 2
    assert [f.name for f in (tmp_path / "profile").iterdir()] == ["trace_rank0.json"]  # no temporary file left
    trace = json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())
    assert sum(event.get("name") == STEP_SPAN for event in trace["traceEvents"]) == 2
    idle = TorchProfilerWindow(tmp_path / "off", rank=0, start=2, steps=2, enabled=False)
    assert not any(idle.acts(step) for step in range(6))


def test_phases_are_timed_every_logged_step(profiled):
    run_dir, _ = profiled
    records = run_metrics(run_dir)
    steps = [r for r in records if "ms_per_step" in r]
    assert [r["step"] for r in steps] == [5, 10, 15, 20]
    for record in steps:
        phases = record["phases_ms"]
        assert all(phases[name] > 0 for name in ("data", "forward", "backward", "optimizer"))
        assert sum(phases[name] for name in ("data", "forward", "backward", "optimizer")) <= record["ms_per_step"]
    # Eval and checkpoint at step 10 are reported once, in the next window.
    assert steps[2]["phases_ms"]["eval"] > 0 and steps[2]["phases_ms"]["checkpoint"] > 0


def test_torch_profiler_window_writes_a_chrome_trace_per_rank(profiled):
    run_dir, _ = profiled
    for rank in (0, 1):
        trace = json.loads((run_dir / "profile" / f"trace_rank{rank}.json").read_text())
        names = {event.get("name", "") for event in trace["traceEvents"]}
        assert any("aten::" in name for name in names)


def test_sampler_sees_both_ranks_and_says_once_that_there_is_no_nvidia_smi(profiled):
    run_dir, result = profiled
    assert (result.stdout + result.stderr).count("nvidia-smi not found") == 1
    samples = [json.loads(line) for line in (run_dir / "samples" / "node0.jsonl").read_text().splitlines()]
    assert samples
    for sample in samples:
        assert "gpus" not in sample and 0 <= sample["cpu_pct"] <= 100 and sample["mem_used_mib"] > 0
        assert sorted(p["rank"] for p in sample["procs"]) == [0, 1]
        assert all(p["rss_mib"] > 50 for p in sample["procs"])


def test_the_sampler_measures_the_load_other_processes_put_on_the_node(tmp_path):
    """A process of known CPU use beside the sampler: the sampler counts it as others' load, and
    counts nothing of its own process. Whatever else runs on the node meanwhile (another test, a
    busy machine) is measured over the same seconds and may only add to others' load."""
    from gptcore.telemetry.sampler import Sampler, read_samples

    # Started through a shell that exits at once, so it is not a child of this process (a rank's
    # children count as the rank's own load).
    started = subprocess.run(["sh", "-c", f"{sys.executable} -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, timeout=10)
    burner, me, cpus = psutil.Process(int(started.stdout)), psutil.Process(), psutil.cpu_count()
    try:
        burner.cpu_percent(None), me.cpu_percent(None), psutil.cpu_percent(None)
        sampler = Sampler(tmp_path, node_rank=0, interval=0.5).start()
        time.sleep(4)
        sampler.stop()
        # % of the node over the same seconds: the burner, this process, everything.
        burned, ours, node = burner.cpu_percent(None) / cpus, me.cpu_percent(None) / cpus, psutil.cpu_percent(None)
    finally:
        burner.kill()
    rest = max(0.0, node - ours - burned)  # other processes than the burner and this one
    # The mean of the samples, like the test's own figures, is an average over the same seconds; a
    # median is not, and differs from it where the rest of the node's load comes in bursts.
    others = statistics.mean(sample["others_cpu_pct"] for sample in read_samples(tmp_path / "node0.jsonl"))
    assert burned > 20 and burned - 6 < others < burned + rest + 6, (others, burned, rest)


def test_the_cost_of_a_shared_node_is_its_time_against_its_quiet_windows():
    """Windows of 10 steps, one logged each second: the first two quiet at 100 ms/step, the
    next three beside another job at 300 ms/step; two samples a window."""
    from gptcore.telemetry.sampler import shared_node_cost

    steps = [{"step": 10 * k, "time": float(k), "ms_per_step": 100.0 if k <= 2 else 300.0} for k in range(6)]

    def samples(loads):
        return [{"time": k - half, "others_cpu_pct": load} for k, load in enumerate(loads) for half in (0.5, 0.0)]

    assert shared_node_cost(steps, samples([0, 2, 3, 8, 9, 5])) is None  # at most 10% of the node: quiet
    line = shared_node_cost(steps, samples([0, 1, 2, 50, 60, 55]))
    assert line == ("shared node: other processes used 50% of its CPU while this run trained (median of 10 samples): "
                    "its steps took 11 s, about 5 s at the 100 ms/step of its 2 quiet window(s) (2.2x)"), line
    line = shared_node_cost(steps, samples([0, 40, 45, 50, 60, 55]))
    assert line.endswith("(median of 10 samples); no logged window ran without them, so what they cost is not known"), line
