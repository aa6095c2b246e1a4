"""The docs, followed: every gptcore command and every report that README.md and docs/ show, run as
typed, in reading order, in one fresh directory, the way a reader who follows them would. Three
things are added: a few steps at the end of each training command (and a CPU-sized model for the
GPU presets), a few batches and tokens at the end of each eval and quantize, and the files a reader
brings (a book, a folder of texts, a JSON Lines file, a nanoGPT run). The docs' other commands
(sbatch, torchrun, the sweep) need a cluster or ranks; test_docs.py names the test that runs each
of them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import REPO, write_corpus
from doc_commands import every_command, split
from warm_start import WarmStarter
from gptcore.data.corpus import corpus_dir, read_meta

pytestmark = pytest.mark.slow

FEW_STEPS = ["train.max_iters=12", "train.warmup_iters=2", "train.eval_interval=6", "train.eval_iters=2",
             "train.log_interval=3", "train.sample_tokens=20"]
CPU_SIZED = ["model.n_layer=2", "model.n_head=2", "model.n_embd=64", "model.block_size=64", "train.batch_size=8",
             "train.grad_accum=1"]
GPU_PRESETS = ("seed", "large")
# Their defaults (20 batches of 16 rows each for fp32 and the quantized model, 200 decoded tokens each)
# were nearly half of the session's time on a CPU without AVX-512; the flags work the same with fewer.
FEW_BATCHES = {"eval": ["--batches", "2"], "quantize": ["--eval-batches", "2", "--bench-tokens", "20"]}
# What a nanoGPT user has before `gptcore import`: its run's ckpt.pt and its dataset's meta.pkl,
# here the ones our own nanoGPT export wrote a command earlier.
NANOGPT_FILES = {"out-shakespeare-char/ckpt.pt": "runs/cpu/nano/ckpt.pt",
                 "data/shakespeare_char/meta.pkl": "runs/cpu/nano/meta.pkl"}


def session_argv(command: str) -> list[str] | None:
    """["gptcore", ARGS...] or ["analysis.report", ARGS...] for a docs command that is gptcore's or
    the report's (training ones with FEW_STEPS added); None for the docs' other commands."""
    env, words = split(command)
    if words[:3] == ["python", "-m", "gptcore"]:
        words = ["gptcore", *words[3:]]
    if not env and words[:1] == ["gptcore"]:
        if words[1] == "train":
            config = words[words.index("--config") + 1] if "--config" in words else None
            words = [*words, *FEW_STEPS, *(CPU_SIZED if config in GPU_PRESETS else [])]
        return [*words, *FEW_BATCHES.get(words[1], [])]
    # RUN_DIR... --out DIR, or runs/sweep/n*: not a path until a reader (or a sweep) supplies one
    placeholder = any(word.rstrip(".").isupper() or "*" in word for word in words[3:])
    if not env and words[:3] == ["python", "-m", "analysis.report"] and not placeholder:
        return words[2:]
    return None


def session_commands() -> list[str]:
    return [command for command in every_command() if session_argv(command)]


def bring_the_readers_files(home: Path) -> None:
    write_corpus(home / "book.txt", chars=40_000)
    (home / "corpus").mkdir()
    for index in range(2):
        write_corpus(home / "corpus" / f"part{index}.txt", chars=20_000, seed=index + 1)
    lines = [json.dumps({"text": write_corpus(home / "doc.txt", chars=3_000, seed=10 + i).read_text()})
             for i in range(3)]
    (home / "doc.txt").unlink()
    (home / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def outputs(argv: list[str]) -> list[str]:
    """The files and directories a command says it writes: --out PATH, and out_dir's checkpoint."""
    made = [argv[argv.index("--out") + 1]] if "--out" in argv else []
    made += [word.split("=", 1)[1] + "/ckpt.pt" for word in argv if word.startswith("out_dir=")]
    return made


def test_the_docs_commands_run_as_typed_in_reading_order(tmp_path):
    commands = session_commands()
    assert len(commands) >= 24, commands  # the CLI flows of the README, training, export and gpus guides
    home = tmp_path / "home"
    home.mkdir()
    bring_the_readers_files(home)
    # This checkout's gptcore and analysis/, as from its root, where the docs' commands are typed;
    # each command a process forked from one interpreter that imported torch once (warm_start).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    starter = WarmStarter(home, env)
    printed = {}
    try:
        for command in commands:
            argv = session_argv(command)
            for needed, source in NANOGPT_FILES.items():
                if needed in argv and not (home / needed).exists():
                    (home / needed).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(home / source, home / needed)
            module = "gptcore" if argv[0] == "gptcore" else argv[0]
            done = starter.run(module, argv[1:], home, env, timeout=300)
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            assert "Traceback" not in done.stderr, f"{command}\n{done.stderr[-3000:]}"
            for path in outputs(argv):
                assert (home / path).exists(), f"{command} did not write {path}"
            printed[command] = done.stdout
    finally:
        starter.close()
    # The main job trains on the corpus env/setup.sh fetched: no text of the reader's is needed.
    meta = read_meta(corpus_dir("shakespeare", "none"))
    assert f"vocab {meta['vocab_size']} characters, train {meta['train_tokens']:,} tokens" in \
        printed["gptcore train --config fast out_dir=runs/fast"]
    finished = " ".join(commands)
    # The reader's flow reached its ends: a fine-tuned book model quantized, a report, a GGUF file.
    for end in ("runs/book/ckpt_int8.pt", "runs/fast/report", "runs/cpu/model-q8_0.gguf"):
        assert end in finished and (home / end).exists(), end
