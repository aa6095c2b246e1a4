"""Every input error a user can make gets one line naming the problem and the fix, exit 2
(1 for failures at run time), no traceback, nothing overwritten."""

import pytest
import torch

from conftest import assert_one_line_error, gptcore_here, run_gptcore


def assert_error(capsys, code, *fragments, args):
    result = gptcore_here(capsys, *args)
    assert_one_line_error(result, code, *fragments)
    assert result.stderr.startswith("gptcore: error: ")


def train_args(tmp_path, data, *extra):
    return ["train", "--config", "tiny", f"data.path={data}", f"out_dir={tmp_path / 'run'}", *extra]


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00", "looks binary"),
    (b"na\xefve caf\xe9", "is not UTF-8"),
    (b"short text\n" * 3, "fewer than block_size+1"),
])
def test_bad_data_files(tmp_path, capsys, content, fragment):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    assert_error(capsys, 2, fragment, args=train_args(tmp_path, path))
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_bad_yaml(tmp_path, capsys, corpus):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: [4\n")
    assert_error(capsys, 2, "not valid YAML", str(bad), args=["train", "--config", bad, f"data.path={corpus}"])


@pytest.mark.parametrize("override, fragment", [
    ("model.nlayer=2", "did you mean model.n_layer"),
    ("train.batch_size=eight", "needs an integer"),
    ("model.n_embd=33", "divisible by model.n_head"),
    ("train.lr=-0.1", "must be positive"),
])
def test_bad_overrides(tmp_path, capsys, corpus, override, fragment):
    assert_error(capsys, 2, fragment, args=train_args(tmp_path, corpus, override))


def test_checkpoint_errors(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert_error(capsys, 2, "does not exist", args=["sample", "--ckpt", missing])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    assert_error(capsys, 2, "not a gptcore checkpoint", args=["eval", "--ckpt", foreign])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a zip file at all")
    assert_error(capsys, 2, "cannot be read", args=["sample", "--ckpt", garbage])


def test_a_cpu_compile_without_a_cpp_compiler_is_refused_before_anything_is_written(tmp_path, capsys, corpus):
    """torch.compile builds its CPU kernels with a C++ compiler; on a machine without one (here CXX
    names a compiler that does not exist) training and sampling say so instead of a traceback."""
    no_compiler = {"CXX": str(tmp_path / "no-such-g++")}
    refused = run_gptcore(*train_args(tmp_path, corpus, "train.device=cpu", "train.compile=true"), env=no_compiler)
    assert_one_line_error(refused, 2, "train.compile=true", "C++ compiler", "no-such-g++", "train.compile=false")
    assert not (tmp_path / "run").exists()
    trained = gptcore_here(capsys, *train_args(tmp_path, corpus, "train.max_iters=2", "train.sample_tokens=0"))
    assert trained.returncode == 0
    sampled = run_gptcore("sample", "--ckpt", tmp_path / "run" / "ckpt.pt", "--device", "cpu", "--compile",
                          env=no_compiler)
    assert_one_line_error(sampled, 2, "--compile", "C++ compiler", "sample without --compile")


@pytest.mark.slow
def test_truncated_checkpoint_and_prompt_outside_vocabulary(tmp_path, corpus):
    """As a user would meet them: real processes on a real, then damaged, checkpoint."""
    run_dir = tmp_path / "run"
    assert run_gptcore("train", "--config", "tiny", f"data.path={corpus}", f"out_dir={run_dir}",
                       "train.max_iters=5", "train.sample_tokens=0").returncode == 0
    ckpt = run_dir / "ckpt.pt"
    assert_one_line_error(run_gptcore("sample", "--ckpt", ckpt, "--prompt", "Zebra\u00e9"), 2, "never saw")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert_one_line_error(run_gptcore("sample", "--ckpt", truncated), 2, "cannot be read", "truncated")
    assert_one_line_error(run_gptcore("train", "--config", "tiny", f"data.path={corpus}",
                                      f"out_dir={tmp_path / 'r2'}", "model.n_head=3"), 2, "divisible")


def test_usage_errors_are_one_line(capsys):
    assert_error(capsys, 2, "invalid choice", args=["frobnicate"])
    assert_error(capsys, 2, "--ckpt", args=["sample"])
    assert "gptcore: error: gptcore" not in gptcore_here(capsys, "sample").stderr  # said once


@pytest.mark.parametrize("command, shown", [
    ("sample", ["--tokens TOKENS", "characters to generate (default: 500)", "(default: auto)", "fresh seed"]),
    ("eval", ["fixed validation batches (default: 20)", "rows per batch (default: 16)"]),
    ("quantize", ["fixed val batches for the loss report; 0 skips (default: 20)"]),
])
def test_help_says_what_each_option_does_and_its_default(command, shown):
    result = run_gptcore(command, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for fragment in shown:
        assert fragment in text, (fragment, text)


@pytest.mark.parametrize("args", [
    ["sample", "--ckpt", "x.pt", "--threads", "100000"],
    ["eval", "--ckpt", "x.pt", "--threads", "100000"],
    ["quantize", "--ckpt", "x.pt", "--mode", "int8", "--out", "q.pt", "--threads", "100000"],
    ["quantize", "--ckpt", "x.pt", "--mode", "int8", "--out", "q.pt", "--threads", "0"],
])
def test_thread_counts_past_the_cpus_this_process_may_use_are_refused(capsys, args):
    result = gptcore_here(capsys, *args)
    assert_one_line_error(result, 2, "--threads")

