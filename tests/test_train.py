"""Training from the command line, as a user runs it: train, resume, sample, eval."""

import json
import os
import subprocess

import pytest
import torch

from conftest import REPO, assert_one_line_error, run_metrics, run_gptcore, step_losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    result = run_gptcore("train", "--config", "tiny", f"data.path={corpus}", f"out_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir, result


def test_train_writes_run_dir_progress_and_a_sample(trained):
    run_dir, result = trained
    assert {"ckpt.pt", "metrics.jsonl", "config.yaml"} <= {p.name for p in run_dir.iterdir()}
    out = result.stdout
    assert "world_size=1" in out
    assert "step 20/20 | loss" in out and "tok/s | ETA" in out and "ms/step" in out
    assert "eval step 20: train" in out and "bits/char" in out
    assert "--- sample (40 tokens" in out
    records = run_metrics(run_dir)
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20]
    assert all(set(r["phases_ms"]) >= {"data", "forward", "backward", "optimizer"} for r in records if "loss" in r)
    assert records[-1]["eval"] and records[-1]["val_loss"] < 3.5  # learned something from log(vocab) ~ 3.3+
    # It ends with what it did, where the model is and what to run next.
    done = out.strip().splitlines()[-4:]
    assert done[0].startswith("done: 20 steps in ") and f"checkpoint {run_dir / 'ckpt.pt'}" in done[0]
    assert f"best val loss {records[-1]['val_loss']:.4f}" in done[0]
    assert done[1] == f'next: gptcore sample --ckpt {run_dir / "ckpt.pt"} --prompt "..." --tokens 300'
    assert "gptcore quantize --ckpt" in done[2] and f"python -m analysis.report {run_dir}" in done[3]


@pytest.mark.slow
def test_sample_and_eval_from_the_checkpoint(trained):
    run_dir, _ = trained
    ckpt = run_dir / "ckpt.pt"
    first = run_gptcore("sample", "--ckpt", ckpt, "--prompt", "The king", "--tokens", "30", "--seed", "3")
    second = run_gptcore("sample", "--ckpt", ckpt, "--prompt", "The king", "--tokens", "30", "--seed", "3")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("The king")
    assert "--seed 3 repeats it" in first.stderr
    # Without --seed each sample is new, and says how to get it again.
    fresh = [run_gptcore("sample", "--ckpt", ckpt, "--tokens", "60") for _ in range(2)]
    assert fresh[0].stdout != fresh[1].stdout
    seed = fresh[0].stderr.split("--seed ")[1].split()[0]
    assert run_gptcore("sample", "--ckpt", ckpt, "--tokens", "60", "--seed", seed).stdout == fresh[0].stdout
    assert len(first.stdout) == len("The king") + 30 + len("\n")  # the text, then print's newline
    assert "tokens/s" in first.stderr and "KV cache" in first.stderr
    evaluated = run_gptcore("eval", "--ckpt", ckpt, "--json", "--batches", "4")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["val_bpc"] == pytest.approx(result["val_loss"] / 0.6931471805599453)
    assert 0 < result["val_loss"] < 3.5


def test_resume_is_bit_identical_to_training_straight_through(tmp_path, corpus):
    common = ["--config", "tiny", f"data.path={corpus}", "train.max_iters=30", "model.dropout=0.1",
              "train.sample_tokens=0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_gptcore("train", *common, f"out_dir={straight}").returncode == 0
    first = run_gptcore("train", *common, f"out_dir={split}", "train.stop_at=15")
    assert first.returncode == 0, first.stderr
    assert torch.load(split / "ckpt.pt", weights_only=True)["step"] == 15
    second = run_gptcore("train", *common, f"out_dir={split}", "resume=auto")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "at step 15" in second.stdout
    a = torch.load(straight / "ckpt.pt", weights_only=True)
    b = torch.load(split / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 30
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert step_losses(straight) == step_losses(split)


def test_an_existing_run_is_not_overwritten(trained):
    run_dir, _ = trained
    before = (run_dir / "ckpt.pt").read_bytes()
    result = run_gptcore("train", "--config", "tiny", f"out_dir={run_dir}", f"data.path={run_dir}/data")
    assert_one_line_error(result, 2, "already exists", "resume=auto")
    assert (run_dir / "ckpt.pt").read_bytes() == before
    # resume=auto on a run that is complete says so, and trains and samples nothing.
    again = run_gptcore("train", "--config", "tiny", f"out_dir={run_dir}", f"data.path={run_dir}/data", "resume=auto")
    assert again.returncode == 0, again.stderr
    last = again.stdout.strip().splitlines()[-1]
    assert f"{run_dir} is complete" in last and "step 20/20" in last and "nothing was trained or sampled" in last
    assert "--- sample" not in again.stdout and "done:" not in again.stdout and "step 20/20 | loss" not in again.stdout
    assert (run_dir / "ckpt.pt").read_bytes() == before


def test_the_report_hint_runs_as_printed(trained):
    """The last hint names the venv's Python, so it runs from the quick start's shell as typed."""
    run_dir, result = trained
    hint = result.stdout.strip().splitlines()[-1].split()
    assert hint[1:3] == ["-m", "analysis.report"]
    report = subprocess.run([*hint[:-2], "--out", str(run_dir / "report")], cwd=REPO, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}, timeout=300)
    assert report.returncode == 0, report.stderr
    assert (run_dir / "report" / "report.md").is_file()


@pytest.mark.slow
def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    run_dir = tmp_path / "nan"
    common = ["--config", "tiny", f"data.path={corpus}", f"out_dir={run_dir}", "train.sample_tokens=0"]
    assert run_gptcore("train", *common, "train.stop_at=10").returncode == 0
    good = (run_dir / "ckpt.pt").read_bytes()
    result = run_gptcore("train", *common, "resume=auto", "train.lr=1e30", "train.grad_clip=0")
    assert_one_line_error(result, 1, "NaN/inf", "step 10")
    assert (run_dir / "ckpt.pt").read_bytes() == good
