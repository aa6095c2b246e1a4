"""Launching as a cluster user types it: the launch scripts with whatever Python is first on PATH
(they move themselves into the checkout's environment), and answers that need no torch stay
instant."""

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import REPO, assert_one_line_error


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A Python with nothing installed, like a login node's system python3."""
    where = tmp_path_factory.mktemp("bare") / "venv"
    venv.EnvBuilder(with_pip=False).create(where)
    return where / "bin" / "python"


def imported(stderr: str) -> set[str]:
    """Top-level modules that `python -X importtime` saw imported."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("script", ["launch/sweep.py", "launch/submit.py", "launch/monitor.py"])
def test_a_python_without_the_dependencies_hands_over_to_the_checkouts_environment(bare_python, script):
    result = subprocess.run([str(bare_python), script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr


def test_without_an_environment_it_says_what_to_run(bare_python, tmp_path):
    result = subprocess.run([str(bare_python), "launch/sweep.py", "--gpus", "1,2", "--dry-run"], cwd=REPO,
                            env={**os.environ, "GPTCORE_VENV": str(tmp_path / "none")}, capture_output=True, text=True,
                            timeout=60)
    assert_one_line_error(result, 1, "sweep.py: error:", "bash env/setup.sh")


def test_help_and_a_dry_run_never_import_torch(tmp_path):
    for args in (["--help"], ["--gpus", "1,2", "--config", "tiny", "--executor", "local", "--dry-run",
                              "--out", str(tmp_path / "s")]):
        result = subprocess.run([sys.executable, "-X", "importtime", "launch/sweep.py", *args], cwd=REPO,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout
        assert "torch" not in imported(result.stderr)


def test_a_config_typo_is_reported_before_torch_is_imported():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "gptcore", "train", "--config", "tiny",
                             "model.nlayer=3"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "did you mean model.n_layer" in result.stderr
    assert "torch" not in imported(result.stderr)
