"""A benchmark given a bad value says so in one line naming the script, exits 2 and writes nothing,
before its first run: not a traceback, nor a failure minutes in, after the runs before it."""

import importlib
import re
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

PRESETS = "cpu, fast, finetune, large, seed, shakespeare_char, tiny"


@pytest.mark.parametrize("script, args, message", [
    ("bench_runtimes", ["--shapes", "tiny,nosuch"],
     "argument --shapes: unknown 'nosuch'; choose from tiny, cpu, shakespeare_char, seed (see --help)"),
    ("bench_runtimes", ["--threads", "1,x"], "argument --threads: 'x' is not a whole number (see --help)"),
    ("bench_runtimes", ["--llama-bench", "{tmp}/llama-bench"],
     "argument --llama-bench: {tmp}/llama-bench is not an executable file (see --help)"),
    ("bench_runtimes", ["--nanogpt", "{tmp}"], "argument --nanogpt: {tmp} has no sample.py, model.py, configurator.py; "
     "pass a nanoGPT checkout (git clone https://github.com/karpathy/nanoGPT) (see --help)"),
    ("bench_main_job", ["--presets", "cpu,fast:train.lr=x"],
     "argument --presets: config key train.lr needs a number, got 'x' (see --help)"),
    ("bench_main_job", ["--data", "{tmp}/absent.txt"],
     "argument --data: {tmp}/absent.txt is neither a corpus (shakespeare) nor a file or directory (see --help)"),
    ("bench_shared_node", ["--train", "--config tiny train.max_iter=3"],
     "argument --train: unknown config key 'train.max_iter'; did you mean train.max_iters? (see --help)"),
    ("bench_shared_node", ["--settings", "GOMP_SPINCOUNT=5"], "argument --settings: unknown 'GOMP_SPINCOUNT=5'; choose "
     "from GOMP_SPINCOUNT=300000 (libgomp's default), GOMP_SPINCOUNT=10000, GOMP_SPINCOUNT=1000, "
     "OMP_WAIT_POLICY=PASSIVE, gptcore's choice (gptcore.cluster.spinning) (see --help)"),
    ("bench_fsdp_memory", ["--configs", "seed,nosuch"],
     f"argument --configs: config 'nosuch' is neither a YAML file nor a preset; presets: {PRESETS} (see --help)"),
    ("bench_prepare", ["--gb", "1e9", "--dir", "{tmp}/corpus"],
     "--gb 1e+09 needs {need} GB in {tmp} (the corpus and 2 prepared copies) and {free} GB are free; pass a smaller "
     "--gb or another --dir"),
    ("bench_time_to_loss", ["--eval-from", "1.5"], "argument --eval-from: must be at most 1, got 1.5 (see --help)"),
    ("bench_time_to_loss", ["--init-from", "{tmp}/ckpt.pt"], "argument --init-from: {tmp}/ckpt.pt is not a file (see "
     "--help)"),
    ("bench_attention", ["--dropout", "-0.1"], "argument --dropout: must be a finite number of at least 0, got -0.1 "
     "(see --help)"),
    ("bench_decode", ["--threads", "0"], "argument --threads: must be at least 1, got 0 (see --help)"),
    ("bench_vs_nanogpt", ["--nanogpt", "{tmp}"], "argument --nanogpt: {tmp} has no train.py, "
     "data/shakespeare_char/input.txt, data/shakespeare_char/train.bin; pass a nanoGPT checkout where "
     "data/shakespeare_char/prepare.py has run (see --help)"),
    ("gpu_check", ["--only", "env,gpu", "--out", "{tmp}/check"], "argument --only: unknown 'gpu'; choose from env, "
     "time_to_loss, train, resume, gpu_to_cpu, inference, decode, checkpoint, ddp, fsdp (see --help)"),
])
def test_a_bad_value_is_one_line_and_exit_2_before_any_work(script, args, message, tmp_path, monkeypatch, capsys):
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in args]
    # The free space is whatever the disk has now, which other jobs change: any figure.
    expected = re.escape(f"{script}: " + message.format(tmp=tmp_path, need=f"{3e18 / 1e9:.1f}", free="FREE") + "\n")
    monkeypatch.setattr(sys, "argv", [f"bench/{script}.py", *args])
    with pytest.raises(SystemExit) as stopped:
        importlib.import_module(script).main()
    assert stopped.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and re.fullmatch(expected.replace("FREE", r"\d+\.\d"), err), err
    assert list(tmp_path.iterdir()) == []


def test_a_refused_benchmark_run_as_a_user_runs_it_prints_no_traceback(tmp_path):
    refused = subprocess.run([sys.executable, REPO / "bench" / "bench_main_job.py", "--presets", "cpu,nosuch"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == (f"bench_main_job: argument --presets: config 'nosuch' is neither a YAML file nor a "
                              f"preset; presets: {PRESETS} (see --help)\n")
    assert list(tmp_path.iterdir()) == []
