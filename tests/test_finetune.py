"""Pretrain on one text, fine-tune on another: the original project's next step, as a user runs it."""

import random

import pytest
import torch

from conftest import WORDS, assert_one_line_error, gptcore_here, run_gptcore, run_metrics, write_corpus

# Words of the second text: none of them is in the first, and they use only its letters.
OTHER_WORDS = ("honey near green stones wild trees whisper gently above rivers seven swans glide "
               "over quiet fields under dark clouds hunters rest beside warm fires singing old tales").split()
PRETRAIN = ["--config", "tiny", "train.max_iters=200", "train.eval_interval=200", "train.sample_tokens=0"]
FINETUNE = ["--config", "tiny", "train.max_iters=40", "train.eval_interval=40", "train.eval_iters=8",
            "train.sample_tokens=0"]


def second_text(path, first_text: str, chars: int = 30_000):
    letters = set(first_text)
    words = [w for w in OTHER_WORDS if set(w) <= letters and w not in WORDS]
    assert len(words) >= 15, words  # enough distinct words for a text of its own
    rng = random.Random(7)
    lines, size = [], 0
    while size < chars:
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))))
        size += len(lines[-1]) + 1
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def final_val_loss(run_dir) -> float:
    return [r["val_loss"] for r in run_metrics(run_dir) if r.get("eval")][-1]


@pytest.mark.slow
@pytest.mark.parametrize("vocab", ["chars", "bytes"])
def test_a_pretrained_model_fine_tunes_to_a_lower_loss_than_training_from_scratch(vocab, tmp_path):
    first = write_corpus(tmp_path / "first.txt", seed=3)
    second = second_text(tmp_path / "second.txt", first.read_text())
    assert not set(second.read_text().split()) & set(first.read_text().lower().split())
    pretrained = tmp_path / "pretrained"
    result = run_gptcore("train", *PRETRAIN, f"data.path={first}", f"out_dir={pretrained}", f"data.vocab={vocab}")
    assert result.returncode == 0, result.stderr
    tuned, scratch = tmp_path / "tuned", tmp_path / "scratch"
    result = run_gptcore("train", *FINETUNE, f"data.path={second}", f"out_dir={tuned}",
                         f"train.init_from={pretrained / 'ckpt.pt'}")
    assert result.returncode == 0, result.stderr
    assert f"starting from the weights of {pretrained / 'ckpt.pt'}" in result.stdout
    assert ("vocab 256 bytes" if vocab == "bytes" else "vocab ") in result.stdout
    result = run_gptcore("train", *FINETUNE, f"data.path={second}", f"out_dir={scratch}", f"data.vocab={vocab}")
    assert result.returncode == 0, result.stderr
    # Same steps, same text, same settings: the start from pretrained weights is the difference.
    assert final_val_loss(tuned) < final_val_loss(scratch) - 0.1, (final_val_loss(tuned), final_val_loss(scratch))
    # The fine-tuned model samples like any other (its own vocabulary, the pretrained one).
    sampled = run_gptcore("sample", "--ckpt", tuned / "ckpt.pt", "--prompt", "honey", "--tokens", "20", "--seed", "1")
    assert sampled.returncode == 0 and sampled.stdout.startswith("honey"), sampled.stderr
    # The README's next step, quantizing it, runs as typed in test_docs_session.py.


def test_init_from_refuses_new_characters_another_shape_and_quantized_weights(corpus, tmp_path, capsys):
    pretrained = tmp_path / "pretrained"
    assert run_gptcore("train", "--config", "tiny", f"data.path={corpus}", f"out_dir={pretrained}",
                       "train.sample_tokens=0").returncode == 0
    ckpt = pretrained / "ckpt.pt"
    book = tmp_path / "book.txt"
    book.write_text("the king and queen walk ZX to the castle 42\n" * 300)
    unseen = gptcore_here(capsys, "train", "--config", "tiny", f"data.path={book}", f"out_dir={tmp_path / 'a'}",
                          f"train.init_from={ckpt}")
    assert_one_line_error(unseen, 2, "4 character(s) that the checkpoint being fine-tuned", "never saw: '24XZ'",
                          "data.vocab=bytes")
    assert not (tmp_path / "a" / "data").exists()
    shape = gptcore_here(capsys, "train", "--config", "tiny", f"data.path={corpus}", f"out_dir={tmp_path / 'b'}",
                         f"train.init_from={ckpt}", "model.n_layer=3")
    assert_one_line_error(shape, 2, "holds another model (model.n_layer=2 (asked 3))", "drop those model.* settings")
    assert gptcore_here(capsys, "quantize", "--ckpt", ckpt, "--mode", "int8", "--out", tmp_path / "q.pt",
                        "--eval-batches", "0", "--bench-tokens", "0").returncode == 0
    quantized = gptcore_here(capsys, "train", "--config", "tiny", f"data.path={corpus}", f"out_dir={tmp_path / 'c'}",
                             f"train.init_from={tmp_path / 'q.pt'}")
    assert_one_line_error(quantized, 2, "is 'int8'-quantized", "fp32 ckpt.pt")
    missing = gptcore_here(capsys, "train", "--config", "tiny", f"data.path={corpus}", f"out_dir={tmp_path / 'd'}",
                           f"train.init_from={tmp_path / 'nope.pt'}")
    assert_one_line_error(missing, 2, "does not exist")
    # A checkpoint whose vocabulary is not characters (altered, or foreign) is refused, not trusted.
    state = torch.load(ckpt, weights_only=True)
    state["vocab"] = [["x"]] * len(state["vocab"])
    torch.save(state, tmp_path / "odd.pt")
    odd = gptcore_here(capsys, "train", "--config", "tiny", f"data.path={corpus}", f"out_dir={tmp_path / 'e'}",
                       f"train.init_from={tmp_path / 'odd.pt'}")
    assert_one_line_error(odd, 2, "is damaged or from another version", "distinct characters")
