"""A gptcore model leaves for Hugging Face and nanoGPT, and a nanoGPT model comes in, checked
against the real `transformers` and against nanoGPT's documented layout, number for number."""

import json
import os
import pickle

import pytest
import torch

from conftest import assert_one_line_error, gptcore_here, run_gptcore
from gptcore.inference.generate import generate_text, load_model
from gptcore.models.gpt import GPT

BATCH = 4
BLOCK = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("interop") / "run"
    result = run_gptcore("train", "--config", "tiny", f"data.path={corpus}", f"out_dir={run_dir}",
                         f"model.block_size={BLOCK}", "train.max_iters=60", "train.sample_tokens=0")
    assert result.returncode == 0, result.stderr
    return run_dir / "ckpt.pt", corpus.read_text()


def full_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(x, x)  # with targets, gptcore returns the logits of every position
    return logits


def batch_of(text: str, tokenizer) -> torch.Tensor:
    ids = tokenizer.encode(text[: BATCH * BLOCK])
    return torch.tensor(ids, dtype=torch.long).view(BATCH, BLOCK)


def test_a_hugging_face_export_computes_what_gptcore_computes(trained, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    ckpt, text = trained
    out = tmp_path / "hf"
    exported = gptcore_here(capsys, "export", "--ckpt", ckpt, "--format", "hf", "--out", out)
    assert exported.returncode == 0, exported.stderr
    assert "AutoModelForCausalLM.from_pretrained" in exported.stdout
    ours = load_model(ckpt, "cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.activation_function == "gelu"
    # The tokenizer: a paragraph encodes to gptcore's ids, and they decode back to it.
    paragraph = text[3000:3600]
    assert tokenizer(paragraph)["input_ids"] == ours.tokenizer.encode(paragraph)
    assert tokenizer.decode(ours.tokenizer.encode(paragraph)) == paragraph
    # The model: the same logits on 4 x 64 tokens, in fp32.
    x = batch_of(text[5000:], ours.tokenizer)
    with torch.no_grad():
        theirs = hf(x).logits
    assert theirs.shape == (BATCH, BLOCK, ours.config.model.vocab_size)
    torch.testing.assert_close(theirs, full_logits(ours.model, x), atol=1e-5, rtol=0)
    # Greedy generation of 50 tokens: the same text.
    prompt = text[:10]
    ours_text, _ = generate_text(ours, prompt, 50, temperature=0.0)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    generated = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=50, do_sample=False,
                            pad_token_id=0)
    assert generated.shape[1] == len(prompt) + 50
    assert tokenizer.decode(generated[0]) == ours_text


def test_biases_and_dropout_carry_over_to_hugging_face(tmp_path):
    """A model with biases (GPT-2's own layout) exports its biases, and its dropout."""
    transformers = pytest.importorskip("transformers")
    from gptcore.config import ModelConfig
    from gptcore.formats.hf import hf_directory

    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, dropout=0.1, bias=True, vocab_size=40)
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)  # make every bias matter
    out = tmp_path / "hf"
    out.mkdir()
    for name, payload in hf_directory(model.state_dict(), config, [chr(65 + i) for i in range(40)]).items():
        (out / name).write_bytes(payload)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.resid_pdrop == hf.config.attn_pdrop == 0.1
    x = torch.randint(0, 40, (BATCH, BLOCK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, full_logits(model, x), atol=1e-5, rtol=0)


def nanogpt_layout(model: GPT, vocab: list[str], dataset: str) -> tuple[dict, bytes]:
    """What nanoGPT's train.py saves for a compiled model, and its prepare.py's meta.pkl."""
    args = model.config
    ckpt = {
        "model": {f"_orig_mod.{name}": tensor.clone() for name, tensor in model.state_dict().items()},
        "optimizer": torch.optim.AdamW(model.parameters()).state_dict(),
        "model_args": dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                           bias=args.bias, vocab_size=args.vocab_size, dropout=args.dropout),
        "iter_num": 5000, "best_val_loss": torch.tensor(1.4697),
        "config": {"dataset": dataset, "batch_size": 64, "learning_rate": 1e-3, "compile": True},
    }
    meta = {"vocab_size": len(vocab), "itos": dict(enumerate(vocab)), "stoi": {ch: i for i, ch in enumerate(vocab)}}
    return ckpt, pickle.dumps(meta)


def test_a_nanogpt_checkpoint_imports_with_the_same_logits(trained, corpus, tmp_path, capsys):
    ckpt, text = trained
    ours = load_model(ckpt, "cpu")
    nano_ckpt, meta = nanogpt_layout(ours.model, ours.tokenizer.vocab, "shakespeare_char")
    torch.save(nano_ckpt, tmp_path / "ckpt.pt")
    (tmp_path / "meta.pkl").write_bytes(meta)
    out = tmp_path / "imported.pt"
    # Without its vocabulary a character model cannot be used: the error names the file to pass.
    missing = gptcore_here(capsys, "import", "--nanogpt", tmp_path / "ckpt.pt", "--out", out)
    assert_one_line_error(missing, 2, "--meta data/shakespeare_char/meta.pkl")
    imported = gptcore_here(capsys, "import", "--nanogpt", tmp_path / "ckpt.pt", "--meta", tmp_path / "meta.pkl",
                            "--out", out)
    assert imported.returncode == 0, imported.stderr
    assert "nanoGPT step 5000" in imported.stdout
    model = load_model(out, "cpu")
    x = batch_of(text[5000:], ours.tokenizer)
    torch.testing.assert_close(full_logits(model.model, x), full_logits(ours.model, x), atol=0, rtol=0)
    assert model.tokenizer.vocab == ours.tokenizer.vocab
    # What gptcore does with its own checkpoints, it does with this one.
    sampled = run_gptcore("sample", "--ckpt", out, "--prompt", text[:5], "--tokens", "20", "--seed", "1")
    assert sampled.returncode == 0 and sampled.stdout.startswith(text[:5]), sampled.stderr
    quantized = gptcore_here(capsys, "quantize", "--ckpt", out, "--mode", "int8", "--out", tmp_path / "q.pt",
                             "--eval-batches", "0", "--bench-tokens", "0")
    assert quantized.returncode == 0, quantized.stderr
    evaluated = gptcore_here(capsys, "eval", "--ckpt", out, "--data", corpus, "--batches", "2", "--json")
    assert evaluated.returncode == 0 and json.loads(evaluated.stdout)["val_loss"] < 3.0, evaluated.stderr
    tuned = run_gptcore("train", "--config", "finetune", f"data.path={corpus}", f"out_dir={tmp_path / 'tuned'}",
                        f"train.init_from={out}", "train.max_iters=5", "train.eval_interval=5", "train.eval_iters=2",
                        "train.sample_tokens=0", "train.device=cpu")
    assert tuned.returncode == 0 and "starting from the weights of" in tuned.stdout, tuned.stderr
    # gptcore names the nanoGPT file for what it is, with the command that converts it.
    foreign = gptcore_here(capsys, "sample", "--ckpt", tmp_path / "ckpt.pt")
    assert_one_line_error(foreign, 2, "is a nanoGPT checkpoint", "gptcore import --nanogpt")


def test_a_vocabulary_in_another_order_is_sorted_with_the_embedding(tmp_path, capsys):
    """nanoGPT's prepare.py sorts its characters; a meta.pkl that does not still imports, its
    embedding rows permuted so that every character keeps its vector."""
    from gptcore.config import ModelConfig

    vocab = list("zyxabc \n")
    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, dropout=0.0, bias=False, vocab_size=len(vocab))
    torch.manual_seed(0)
    model = GPT(config).eval()
    nano_ckpt, meta = nanogpt_layout(model, vocab, "toy")
    torch.save(nano_ckpt, tmp_path / "ckpt.pt")
    (tmp_path / "meta.pkl").write_bytes(meta)
    imported = gptcore_here(capsys, "import", "--nanogpt", tmp_path / "ckpt.pt", "--meta", tmp_path / "meta.pkl",
                            "--out", tmp_path / "out.pt")
    assert imported.returncode == 0, imported.stderr
    loaded = load_model(tmp_path / "out.pt", "cpu")
    assert loaded.tokenizer.vocab == sorted(vocab)
    text = "abc xyz\nzyx cba"
    theirs = torch.tensor([[vocab.index(ch) for ch in text]])
    mine = torch.tensor([loaded.tokenizer.encode(text)])
    order = [vocab.index(ch) for ch in sorted(vocab)]  # our id -> their id
    torch.testing.assert_close(full_logits(loaded.model, mine), full_logits(model, theirs)[..., order])


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Payload.marker}",))


def test_a_meta_pkl_that_would_run_code_is_refused_and_runs_nothing(trained, tmp_path, capsys):
    ckpt, _ = trained
    ours = load_model(ckpt, "cpu")
    nano_ckpt, _ = nanogpt_layout(ours.model, ours.tokenizer.vocab, "shakespeare_char")
    torch.save(nano_ckpt, tmp_path / "ckpt.pt")
    Payload.marker = tmp_path / "pwned"
    vocab = ours.tokenizer.vocab
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": len(vocab), "itos": dict(enumerate(vocab)),
                                                      "stoi": Payload()}))
    out = tmp_path / "imported.pt"
    result = gptcore_here(capsys, "import", "--nanogpt", tmp_path / "ckpt.pt", "--meta", tmp_path / "meta.pkl",
                          "--out", out)
    assert_one_line_error(result, 2, "wants to run code when unpickled", "posix.system", "nothing ran")
    assert not Payload.marker.exists() and not out.exists()
    # model_args claiming a model far larger than the file are refused before anything is built.
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": len(vocab), "itos": dict(enumerate(vocab))}))
    huge = dict(nano_ckpt, model_args={**nano_ckpt["model_args"], "n_layer": 900, "n_embd": 4096, "n_head": 32})
    torch.save(huge, tmp_path / "huge.pt")
    claimed = gptcore_here(capsys, "import", "--nanogpt", tmp_path / "huge.pt", "--meta", tmp_path / "meta.pkl",
                           "--out", out)
    assert_one_line_error(claimed, 2, "describes a model of", "its header was altered")
    # A pickle of the wrong shape is named too.
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "itos": ["a", "b"]}))
    wrong = gptcore_here(capsys, "import", "--nanogpt", tmp_path / "ckpt.pt", "--meta", tmp_path / "meta.pkl",
                         "--out", out)
    assert_one_line_error(wrong, 2, "has no character vocabulary")


def test_nanogpt_export_round_trips_and_foreign_files_are_named(trained, tmp_path, capsys):
    ckpt, text = trained
    exported = gptcore_here(capsys, "export", "--ckpt", ckpt, "--format", "nanogpt", "--out", tmp_path / "nano")
    assert exported.returncode == 0, exported.stderr
    saved = torch.load(tmp_path / "nano" / "ckpt.pt", weights_only=True)
    assert {"model", "model_args", "iter_num", "best_val_loss", "config"} <= set(saved)
    assert saved["model_args"]["block_size"] == BLOCK and saved["iter_num"] == 60
    back = gptcore_here(capsys, "import", "--nanogpt", tmp_path / "nano" / "ckpt.pt", "--meta",
                        tmp_path / "nano" / "meta.pkl", "--out", tmp_path / "back.pt")
    assert back.returncode == 0, back.stderr
    ours, again = load_model(ckpt, "cpu"), load_model(tmp_path / "back.pt", "cpu")
    x = batch_of(text[9000:], ours.tokenizer)
    torch.testing.assert_close(full_logits(again.model, x), full_logits(ours.model, x), atol=0, rtol=0)
    # An existing --out is never written into.
    again_out = gptcore_here(capsys, "export", "--ckpt", ckpt, "--format", "nanogpt", "--out", tmp_path / "nano")
    assert_one_line_error(again_out, 2, "already exists", "nothing was written")
    # A quantized checkpoint is refused, naming what to export instead.
    assert gptcore_here(capsys, "quantize", "--ckpt", ckpt, "--mode", "int8", "--out", tmp_path / "q.pt",
                        "--eval-batches", "0", "--bench-tokens", "0").returncode == 0
    refused = gptcore_here(capsys, "export", "--ckpt", tmp_path / "q.pt", "--format", "hf", "--out", tmp_path / "hf")
    assert_one_line_error(refused, 2, "int8-quantized", "export the fp32 ckpt.pt")
    assert not (tmp_path / "hf").exists()
    # A Hugging Face directory and a safetensors file are named for what they are.
    pytest.importorskip("safetensors")
    assert gptcore_here(capsys, "export", "--ckpt", ckpt, "--format", "hf", "--out", tmp_path / "hf").returncode == 0
    as_dir = gptcore_here(capsys, "eval", "--ckpt", tmp_path / "hf")
    assert_one_line_error(as_dir, 2, "a Hugging Face model", "from_pretrained")
    as_file = gptcore_here(capsys, "sample", "--ckpt", tmp_path / "hf" / "model.safetensors")
    assert_one_line_error(as_file, 2, "is a safetensors file")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_positions"] == BLOCK
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary directory left behind
