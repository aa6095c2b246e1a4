"""Watching a run in TensorBoard and W&B: what a user's tools read back from a real run."""

import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO, assert_one_line_error, gptcore_here, run_gptcore, run_metrics, wait_until
from gptcore.telemetry.sinks import hardware_scalars, scalars_of

LOGGED = ["train/loss", "train/lr", "perf/ms_per_step", "perf/tokens_per_s", "phases/data_ms", "phases/forward_ms",
          "phases/backward_ms", "phases/optimizer_ms"]
EVALUATED = ["eval/train_loss", "eval/val_loss", "eval/val_bpc"]
SYSTEM = ["system/node_cpu_pct", "system/node_mem_used_mib", "system/others_cpu_pct", "system/rank0_cpu_pct",
          "system/rank0_rss_mib"]
SLOW_TINY = ["--config", "tiny", "model.block_size=64", "train.batch_size=64", "train.log_interval=5",
             "train.eval_interval=20", "train.ckpt_interval=50", "train.ckpt_background=false",
             "train.sample_tokens=20", "profile.sampler=true", "profile.sampler_interval=0.02", "log.tensorboard=true"]


def read_events(log_dir):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


@pytest.mark.slow
def test_tensorboard_curves_continue_across_a_kill_and_a_resume_without_duplicates(corpus, tmp_path):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "gptcore", "train", *SLOW_TINY, f"data.path={corpus}", f"out_dir={run_dir}",
               "train.max_iters=100000"]
    first = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Killed outright past the step-50 checkpoint: what it logged after step 50 is redone.
        wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and any(
            r.get("step", 0) >= 60 for r in run_metrics(run_dir)), 120, "the run to log step 60")
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    logged_before = max(r["step"] for r in run_metrics(run_dir) if "loss" in r)
    resumed = run_gptcore("train", *SLOW_TINY, f"data.path={corpus}", f"out_dir={run_dir}", "train.max_iters=80",
                          "resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "at step 50" in resumed.stdout
    events = read_events(run_dir / "tb")
    tags = set(events.Tags()["scalars"])
    assert set(LOGGED + EVALUATED) <= tags and set(SYSTEM) <= tags, tags
    logged = [r["step"] for r in run_metrics(run_dir) if "loss" in r]
    assert logged == list(range(5, 81, 5)) and logged_before >= 60
    for tag in LOGGED:  # every logged step once: the killed session's steps 55.. were dropped
        assert [e.step for e in events.Scalars(tag)] == logged, tag
    for tag in EVALUATED:
        assert [e.step for e in events.Scalars(tag)] == [20, 40, 60, 80], tag
    values = {e.step: e.value for e in events.Scalars("train/loss")}
    assert values == pytest.approx({r["step"]: r["loss"] for r in run_metrics(run_dir) if "loss" in r})
    for tag in SYSTEM:  # hardware figures at the logged steps whose window had a sample
        steps = [e.step for e in events.Scalars(tag)]
        assert steps and len(steps) == len(set(steps)) and set(steps) <= set(logged), (tag, steps)
    # The sample generated at the end is there as text.
    assert "sample/text_summary" in events.Tags()["tensors"]
    sample = events.Tensors("sample/text_summary")[0]
    assert sample.step == 80 and b"```" in sample.tensor_proto.string_val[0]
    # The report writes runs (a sweep's sizes) as one log directory; a rerun never appends to it.
    report = [sys.executable, "-m", "analysis.report", str(run_dir), "--out", str(tmp_path / "report"),
              "--tensorboard", str(tmp_path / "sweep-tb")]
    assert subprocess.run(report, cwd=REPO, capture_output=True, text=True, timeout=120).returncode == 0
    replayed = read_events(tmp_path / "sweep-tb" / "run")
    assert [e.step for e in replayed.Scalars("train/loss")] == logged
    assert set(SYSTEM) <= set(replayed.Tags()["scalars"])
    again = subprocess.run(report, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already exists; choose a new --tensorboard directory" in again.stderr


def test_scalars_are_named_once_for_every_sink():
    window = {"step": 10, "loss": 2.5, "lr": 1e-3, "ms_per_step": 20.0, "tokens_per_s": 1000.0, "mfu": 0.3,
              "phases_ms": {"forward": 5.0, "eval": 80.0}, "comm": {"allreduce_ms": 3.0, "exposed_ms": 1.0, "bytes": 9},
              "time": 1.0}
    assert scalars_of(window) == {"train/loss": 2.5, "train/lr": 1e-3, "perf/ms_per_step": 20.0,
                                  "perf/tokens_per_s": 1000.0, "perf/mfu": 0.3, "phases/forward_ms": 5.0,
                                  "phases/eval_ms": 80.0, "comm/allreduce_ms": 3.0, "comm/exposed_ms": 1.0}
    assert scalars_of({"probe": "allreduce", "seconds": 0.1}) == {}
    samples = [{"time": t, "cpu_pct": 50.0 + t, "mem_used_mib": 100.0 * t, "others_cpu_pct": 5.0,
                "procs": [{"rank": 0, "cpu_pct": 90.0, "rss_mib": 300.0 + t}],
                "gpus": [{"index": 0, "util_pct": 97.0, "mem_used_mib": 4000.0, "mem_total_mib": 80000.0}]}
               for t in (1.0, 2.0, 3.0)]
    assert hardware_scalars(samples) == {
        "system/node_cpu_pct": 52.0, "system/node_mem_used_mib": 300.0, "system/others_cpu_pct": 5.0,
        "system/rank0_cpu_pct": 90.0, "system/rank0_rss_mib": 303.0, "system/gpu0_util_pct": 97.0,
        "system/gpu0_mem_mib": 4000.0}
    assert hardware_scalars([]) == {}


@pytest.mark.slow
def test_an_offline_wandb_run_writes_its_directory_and_a_resume_continues_the_same_run(corpus, tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    # Offline needs no network; a proxy that refuses every connection makes sure none is tried.
    env = {"WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "WANDB_BASE_URL": "http://127.0.0.1:9", "SLURM_JOB_ID": "4242"}
    args = ["train", "--config", "tiny", f"data.path={corpus}", f"out_dir={run_dir}", "log.wandb=offline",
            "log.tensorboard=false", "train.sample_tokens=0"]
    first = run_gptcore(*args, "train.stop_at=10", env=env)
    assert first.returncode == 0, first.stderr
    run_id = (run_dir / "wandb_run_id").read_text()
    second = run_gptcore(*args, "resume=auto", env=env)
    assert second.returncode == 0, second.stderr
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all((d / f"run-{run_id}.wandb").stat().st_size > 0 for d in offline), offline
    assert (run_dir / "wandb_run_id").read_text() == run_id
    logged = (offline[-1] / f"run-{run_id}.wandb").read_bytes()
    assert b"run-4242" in logged and b"train/loss" in logged  # named from the run directory and the job id
    assert "wandb sync" in second.stdout + second.stderr


def test_a_sink_that_cannot_start_is_one_line_before_training(corpus, tmp_path, capsys):
    result = gptcore_here(capsys, "train", "--config", "tiny", f"data.path={corpus}", f"out_dir={tmp_path / 'r'}",
                          "log.wandb=sometimes")
    assert_one_line_error(result, 2, "log.wandb", "off, offline, online")
    yaml_off = tmp_path / "c.yaml"
    yaml_off.write_text("log:\n  wandb: off\n  tensorboard: false\n")
    from gptcore.config import load_config

    config = load_config(str(yaml_off))  # YAML reads `off` as a boolean; it still means off
    assert config.log.wandb == "off" and config.log.tensorboard == "false"
