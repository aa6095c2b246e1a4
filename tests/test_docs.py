"""Every shell command in README.md and docs/ still fits the code: the script or template it names
exists, every --flag it passes is one its program takes, and every key=value override is a
config key with a valid value. And every one is run: gptcore's and the report's by
test_docs_session.py, as typed; the sweeps' plans by test_sweep.py, as typed; and each of the
others by the test that RUN_BY names, which submits the same template or starts the same program
on the local clusters (with the clusters' sizes and a tiny config)."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from conftest import REPO
from doc_commands import DOCS, every_command, shell_commands, split
from gptcore.cli import build_parser
from gptcore.config import load_config
from test_docs_session import session_argv
# Programs that are not ours: the docs show them being used, nothing here can check their flags.
OTHERS = {"tensorboard", "ssh", "wandb", "llama-completion", "squeue", "ollama", "cd", "eval", "source"}
OVERRIDE = re.compile(r"^(?:[a-z_]+\.)?[a-z_]+=")
SWEEPS = "test_sweep.py::test_every_sweep_in_the_docs_plans_as_typed"
FOUR_RANKS = "test_slurm.py::test_four_rank_template_completes_and_quantize_runs_after_it"
TWO_NODES = "test_multinode.py::test_two_nodes_train_like_one"
# The docs' commands that test_docs_session.py does not run, and the test that runs each. A
# sentence instead of a test: a program that is not ours, or what CI runs itself.
RUN_BY = {
    "bash env/setup.sh": ".ci/run sets up every CI run with it",
    "python -m pytest -q": ".ci/run runs it",
    "python -m pytest -q -m 'not slow'": "the same suite, its slow tests left out",
    "sbatch slurm/train_4gpu.sbatch": FOUR_RANKS,
    "sbatch --parsable slurm/train_4gpu.sbatch": FOUR_RANKS,
    "CONFIG=tiny EXTRA=train.max_iters=100 sbatch slurm/train_4gpu.sbatch": FOUR_RANKS,
    "sbatch '--dependency=afterok:$JOB' '--export=ALL,RUN_DIR=runs/gptcore-4gpu-$JOB' slurm/quantize.sbatch":
        FOUR_RANKS,
    "sbatch '--dependency=afterok:$JOB' '--export=ALL,INIT_FROM=runs/gptcore-1gpu-$JOB/ckpt.pt,DATA=book.txt,"
    "CLEAN=seed' slurm/finetune.sbatch": FOUR_RANKS,
    "EXTRA=train.parallel=fsdp sbatch slurm/train_4gpu.sbatch":
        "test_slurm.py::test_fsdp_on_the_four_rank_template_shards_its_checkpoint_and_quantize_reads_it",
    "sbatch -p gpu -t 4:00:00 slurm/train_2gpu.sbatch train.lr=6e-4":
        "test_slurm.py::test_usr1_requeues_and_a_late_sigterm_to_the_rerun_resumes_it_to_exactly_max_iters",
    "sbatch slurm/train_1gpu.sbatch": "test_slurm.py::test_extra_overrides_are_never_glob_expanded",
    "sbatch --parsable slurm/train_1gpu.sbatch":
        "test_slurm.py::test_a_job_submitted_from_outside_the_repository_is_explained_by_the_monitor",
    "sbatch -p cpu --cpus-per-task=16 --export=ALL,DATA=/data/corpus/,OUT=data/corpus slurm/prepare.sbatch":
        "test_slurm.py::test_prepare_template_prepares_a_directory_as_a_cpu_job",
    "python launch/monitor.py": FOUR_RANKS,
    "sbatch -N 2 slurm/train_multinode.sbatch": TWO_NODES,
    "LAUNCHER=srun sbatch -N 2 slurm/train_multinode.sbatch": TWO_NODES,
    "EXTRA=train.parallel=fsdp sbatch -N 2 slurm/train_multinode.sbatch": TWO_NODES,
    "CONFIG=seed EXTRA=train.max_iters=2000 sbatch -N 2 slurm/train_multinode.sbatch": TWO_NODES,
    "sbatch -N 4 --ntasks-per-node=8 --gpus-per-node=8 slurm/train_multinode.sbatch": TWO_NODES,
    "GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0 sbatch -N 2 slurm/train_multinode.sbatch": TWO_NODES,
    "torchrun --nproc-per-node=4 -m gptcore train --config large":
        "test_fsdp.py::test_fsdp_ddp_and_one_rank_follow_one_loss_curve",
    "python -m analysis.report RUN_DIR... --out DIR":
        "test_sweep.py::test_local_sweep_reports_both_sizes_with_gpu_samples",
    "python -m analysis.report 'runs/sweep/n*' --out runs/sweep/report --tensorboard runs/sweep/tb":
        "test_sinks.py::test_tensorboard_curves_continue_across_a_kill_and_a_resume_without_duplicates",
    "EXTRA=log.wandb=offline sbatch slurm/train_4gpu.sbatch": FOUR_RANKS,  # log.wandb=offline: test_sinks.py
    "llama-completion -m runs/cpu/model-q8_0.gguf -p ROMEO: -n 100 -c 128 --temp 0 -no-cnv":
        "test_gguf.py::test_llama_cpp_continues_a_prompt_as_gptcore_sample_does",
    "tensorboard --logdir runs": "TensorBoard's own command",
    "ssh -L 6006:localhost:6006 login.cluster": "ssh's own command",
    "wandb sync 'runs/gptcore-4gpu-1234/wandb/offline-run-*'": "W&B's own command (it needs the network)",
    "squeue --me": "Slurm's own command",
}


@cache
def help_text(*program: str) -> str:
    if program[0] == "gptcore":
        parser = build_parser()
        return parser.format_help() if len(program) == 1 else \
            parser._subparsers._group_actions[0].choices[program[1]].format_help()
    return subprocess.run([sys.executable, *program, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=True).stdout


def check(command: str) -> None:
    env, words = split(command)
    if not words or words[0] in OTHERS:
        return
    config, overrides = env.get("CONFIG"), shlex.split(env.get("EXTRA", ""))
    if words[0] in ("sbatch", "bash"):
        script = next(word for word in words[1:] if word.endswith((".sbatch", ".sh")))
        assert (REPO / script).is_file(), f"{command}: no {script}"
        if words[0] == "sbatch":
            overrides += [word for word in words[words.index(script) + 1:]]
        words = []
    elif words[0] == "torchrun":
        words = ["gptcore", *words[words.index("gptcore") + 1:]]
    elif words[:3] == ["python", "-m", "gptcore"]:
        words = ["gptcore", *words[3:]]
    if words and words[0] == "gptcore":
        program, args = ("gptcore", words[1]), words[2:]
        build_parser().parse_args([words[1], *[w for w in args if not OVERRIDE.match(w)]])
    elif words and words[0] == "python":
        program = tuple(words[1:3]) if words[1] == "-m" else (words[1],)
        args = words[1 + len(program):]
        assert (REPO / program[-1]).is_file() or program[0] == "-m", f"{command}: no {program[-1]}"
    else:
        args, program = [], None
    if program:
        flags = {word.split("=")[0] for word in args if word.startswith("--")}
        missing = [flag for flag in flags if flag not in help_text(*program)]
        assert not missing, f"{command}: {' '.join(program)} takes no {', '.join(missing)}"
        if "--config" in args:
            config = args[args.index("--config") + 1]
        overrides += [word for word in args if OVERRIDE.match(word)]
    if overrides:
        load_config(config, overrides)


def test_the_docs_list_every_guide():
    assert set(DOCS[1:]) == set((REPO / "docs").glob("*.md"))


@pytest.mark.parametrize("path", DOCS, ids=[path.name for path in DOCS])
def test_every_command_in_the_docs_fits_the_code(path):
    commands = shell_commands(path)
    assert commands or path.name in ("reliability.md",), f"{path} shows no command"
    for command in commands:
        check(command)


def test_the_readme_is_a_doorway_and_links_every_doc():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    for doc in DOCS[1:]:
        assert f"(docs/{doc.name})" in readme, f"README.md does not link docs/{doc.name}"


def has_test(reference: str) -> bool:
    """Whether FILE::NAME is a test function."""
    file, name = reference.split("::")
    tree = ast.parse((REPO / "tests" / file).read_text(encoding="utf-8"))
    return any(isinstance(node, ast.FunctionDef) and node.name == name for node in tree.body)


def what_it_runs(command: str) -> str:
    """The word a test that runs COMMAND must contain: its template, script or program."""
    _, words = split(command)
    named = [word for word in words if word.endswith((".sbatch", ".py"))]
    # llama.cpp's CLI and its Python binding (llama_cpp) run the same library on the file.
    return Path(named[0]).name if named else {"python": words[2], "llama-completion": "llama_cpp"}.get(words[0], words[0])


def test_every_command_in_the_docs_is_run_by_a_test():
    others = [command for command in every_command() if not session_argv(command)]
    sweeps = [command for command in others if command.startswith("python launch/sweep.py")]
    assert sorted(set(others) - set(sweeps)) == sorted(RUN_BY), "RUN_BY and the docs' commands differ"
    for command, runner in RUN_BY.items():
        if "::" not in runner:
            continue
        assert has_test(runner), f"{command}: {runner} does not exist"
        assert what_it_runs(command) in (REPO / "tests" / runner.split("::")[0]).read_text(), (command, runner)
    assert has_test(SWEEPS) and sweeps
