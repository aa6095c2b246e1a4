"""Quantization as a user runs it: train a tiny model, quantize it, sample and evaluate the result,
and get one clear error for a damaged file or a wrong group size."""

import json

import pytest
import torch

from conftest import assert_one_line_error, gptcore_here, run_gptcore
from gptcore.checkpointing.checkpoint import save
from gptcore.config import load_config
from gptcore.models.gpt import GPT
from gptcore.inference.quantize import (Int4Linear, Int8Linear, dequantize_int4, dequantize_int8, fp32_model_checkpoint,
                              model_from_quantized, quantize_int4, quantize_int8, quantized_checkpoint,
                              serialized_size)

REPORT_FLAGS = ("--eval-batches", "4", "--bench-tokens", "20")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("quant") / "tiny"
    # Long enough (a few seconds) for the loss to be well below uniform, so its change means something.
    result = run_gptcore("train", "--config", "tiny", f"data.path={corpus}", f"out_dir={out}", "train.max_iters=300",
                         "train.eval_interval=300", "train.sample_tokens=0")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def quantized(run_dir):
    """mode -> (checkpoint, report) for int8, int4 (group 32: tiny's n_embd is 32) and bf16."""
    made = {}
    for mode, group in (("int8", "64"), ("int4", "32"), ("bf16", "64")):
        out = run_dir / f"ckpt_{mode}.pt"
        result = run_gptcore("quantize", "--ckpt", run_dir / "ckpt.pt", "--mode", mode, "--group-size", group,
                             "--out", out, "--device", "cpu", *REPORT_FLAGS)
        assert result.returncode == 0, result.stderr
        assert f"wrote {out}" in result.stdout and "bits/char" in result.stdout and "tokens/s" in result.stdout
        made[mode] = out, json.loads(out.with_suffix(".json").read_text())
    return made


def test_seed_shape_int8_and_int4_files_are_a_quarter_and_a_sixth_of_fp32():
    config = load_config("seed", [])
    config.model.vocab_size = 65
    model = GPT(config.model)
    state = {"model": model.state_dict(), "config": config.to_dict(), "vocab": [chr(32 + i) for i in range(65)]}
    fp32 = serialized_size(fp32_model_checkpoint(state))
    assert fp32 > 4 * model.num_params()
    assert serialized_size(quantized_checkpoint(state, "int8", 64)) <= 0.27 * fp32
    assert serialized_size(quantized_checkpoint(state, "int4", 64)) <= 0.16 * fp32


def test_report_compares_size_loss_and_speed_on_the_same_batches(quantized):
    bounds = {"int8": 1.0, "int4": 3.0, "bf16": 1.0}  # % loss change allowed (measured: < 0.1% each)
    for mode, (ckpt, report) in quantized.items():
        assert report["mode"] == mode and report["size_bytes"][mode] == ckpt.stat().st_size
        assert report["size_ratio"] < (0.55 if mode == "bf16" else 0.45), (mode, report["size_bytes"])
        evaluation = report["eval"]
        assert evaluation["batches"] == 4 and evaluation["fp32"]["val_loss"] < 2.5
        assert abs(evaluation["loss_change_pct"]) < bounds[mode], (mode, evaluation)
        assert evaluation[mode]["val_bpc"] == pytest.approx(evaluation[mode]["val_loss"] / 0.6931471805599453)
        decode = report["decode"]
        assert decode["threads"] == 1 and decode["kv_cache"] and decode["device"] == "cpu"
        for model in ("fp32", mode):
            speed = decode[model]
            assert speed["tokens_per_s"] > 0 and speed["weight_bytes"] > 0
            assert speed["achieved_gbps"] == pytest.approx(speed["weight_bytes"] * speed["tokens_per_s"] / 1e9)
            assert 0 < speed["bandwidth_utilization"] < 1 and "measured copy bandwidth" in speed["bandwidth_source"]
        assert decode[mode]["weight_bytes"] < decode["fp32"]["weight_bytes"]


@pytest.mark.slow
def test_sample_and_eval_take_quantized_checkpoints(quantized):
    for mode, (ckpt, report) in quantized.items():
        sampled = run_gptcore("sample", "--ckpt", ckpt, "--prompt", "The king", "--tokens", "30")
        assert sampled.returncode == 0, sampled.stderr
        assert sampled.stdout.startswith("The king") and len(sampled.stdout) == len("The king") + 30 + len("\n")
        # int8 and int4 say which way they ran: their kernels, or their weights in fp32 (fastest_form)
        assert (f", {mode}, KV cache" if mode == "bf16" else f", {mode} (") in sampled.stderr, sampled.stderr
        evaluated = run_gptcore("eval", "--ckpt", ckpt, "--json", "--batches", "4", "--threads", "1")
        assert evaluated.returncode == 0, evaluated.stderr
        result = json.loads(evaluated.stdout)
        assert result["model"] == mode
        assert result["val_loss"] == pytest.approx(report["eval"][mode]["val_loss"], rel=1e-5)


def test_int8_greedy_text_follows_fp32(run_dir, quantized):
    texts = [run_gptcore("sample", "--ckpt", ckpt, "--prompt", "The ", "--tokens", "40", "--temperature", "0").stdout
             for ckpt in (run_dir / "ckpt.pt", quantized["int8"][0])]
    same = sum(a == b for a, b in zip(*texts))
    assert len(texts[1]) == len(texts[0]) and same >= 0.75 * len(texts[0]), texts


def tampered(source, target, change):
    """A changed copy written by torch.save, so its CRCs are right, as a crafted file or a buggy
    exporter would be: the loader's own checks of the names, shapes and values must catch it."""
    state = torch.load(source, weights_only=True)
    change(state)
    save(state, target)
    return target


def test_damaged_quantized_checkpoints_give_one_clear_error(quantized, tmp_path, capsys):
    source = quantized["int8"][0]
    scales = "transformer.h.0.attn.c_attn.weight.scales"
    cases = {
        "mode": (lambda s: s.update(mode="int4", group_size=32), "tensors missing for mode int4"),
        "shape": (lambda s: s["model"].update({scales: s["model"][scales][:-1]}), scales),
        "missing": (lambda s: s["model"].pop("transformer.wpe.weight.int8"), "transformer.wpe.weight.int8"),
        "header": (lambda s: s.pop("group_size"), "group_size"),
        "nan scale": (lambda s: s["model"][scales].__setitem__(0, float("nan")), f"{scales} holds NaN"),
        "inf norm": (lambda s: s["model"]["transformer.ln_f.weight"].__setitem__(3, float("inf")),
                     "transformer.ln_f.weight holds NaN or infinite"),
    }
    for name, (change, fragment) in cases.items():
        broken = tampered(source, tmp_path / f"{name}.pt", change)
        assert_one_line_error(gptcore_here(capsys, "sample", "--ckpt", broken, "--tokens", "5"), 2, str(broken),
                              fragment)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    assert_one_line_error(run_gptcore("eval", "--ckpt", truncated), 2, str(truncated), "cannot be read")


def test_a_flipped_weight_byte_fails_the_integrity_check(quantized, tmp_path):
    """One bit of the stored int8 weights changed on disk: the file still unpickles, the CRC-32
    that torch.save stores for each record catches it. The same holds for the fp32 checkpoint."""
    for source in (quantized["int8"][0], quantized["int8"][0].parent / "ckpt.pt"):
        data = bytearray(source.read_bytes())
        state = torch.load(source, weights_only=True)
        weight = state["model"]["transformer.h.1.mlp.c_fc.weight" + (".int8" if "int8" in source.name else "")]
        needle = weight.reshape(-1)[:64].contiguous().view(torch.uint8).numpy().tobytes()
        offset = bytes(data).index(needle)  # the tensor's bytes as stored in the zip
        data[offset + 10] ^= 0x04
        flipped = tmp_path / f"flipped-{source.name}"
        flipped.write_bytes(bytes(data))
        assert_one_line_error(run_gptcore("eval", "--ckpt", flipped, "--batches", "1"), 2, str(flipped),
                              "fails its integrity check")


def test_a_wrong_group_size_is_one_clear_error(run_dir, tmp_path):
    for group, fragment in (("0", "must be at least 1"), ("64", "does not divide n_embd 32"), ("48", "use 32")):
        result = run_gptcore("quantize", "--ckpt", run_dir / "ckpt.pt", "--mode", "int4", "--group-size", group,
                             "--out", tmp_path / "q.pt")
        assert_one_line_error(result, 2, "--group-size", fragment)
        assert not (tmp_path / "q.pt").exists()


def test_kernels_compute_what_the_stored_numbers_say():
    """Round-trip error within half a quantization step, and each kernel's output equal to a
    float matmul with the dequantized weight (up to the bf16 rounding of the activations)."""
    torch.manual_seed(0)
    weight, x = torch.randn(96, 128) * 0.02, torch.randn(2, 3, 128)
    q, scales = quantize_int8(weight)
    int8 = dequantize_int8(q, scales)
    assert ((int8 - weight).abs() <= scales.float()[:, None] / 2 + 1e-7).all()
    packed, scales4, zeros = quantize_int4(weight, 32)
    int4 = dequantize_int4(packed, scales4, zeros)
    step = scales4.float().repeat_interleave(32, dim=1)
    assert packed.shape == (96, 64) and ((int4 - weight).abs() <= step / 2 + 1e-6).all()
    for layer, reference in ((Int8Linear(q, scales), int8), (Int4Linear(packed, scales4, zeros), int4)):
        torch.testing.assert_close(layer(x), x @ reference.T, rtol=0.02, atol=2e-3)


def test_a_bf16_model_keeps_its_norms_and_its_loss_in_fp32():
    """Evaluating a bf16 file measures its bf16 matrices, not rounding in the norms or the loss."""
    config = load_config("tiny", [])
    config.model.vocab_size = 20
    torch.manual_seed(0)
    model = GPT(config.model).eval()
    state = {"model": model.state_dict(), "config": config.to_dict(), "vocab": [chr(65 + i) for i in range(20)]}
    stored = quantized_checkpoint(state, "bf16", 64)["model"]
    assert stored["transformer.ln_f.weight"].dtype == torch.float32
    assert stored["transformer.h.0.ln_1.weight"].dtype == torch.float32
    assert stored["transformer.h.0.mlp.c_fc.weight"].dtype == torch.bfloat16
    bf16, mode = model_from_quantized(quantized_checkpoint(state, "bf16", 64), config)
    x, y = torch.randint(0, 20, (2, 2, 32))
    with torch.no_grad():
        _, reference = model(x, y)
        _, loss = bf16(x, y)
    assert mode == "bf16" and loss.dtype == torch.float32
    assert abs(loss.item() / reference.item() - 1) < 0.01


def test_a_bytes_model_quantizes_samples_and_evaluates_from_a_file_outside_its_run(corpus, tmp_path, capsys):
    """The README's pretrain flow trains on bytes; its quantized files load, sample and evaluate on
    the data beside the checkpoint they came from, wherever --out puts them."""
    run = tmp_path / "bytes"
    trained = run_gptcore("train", "--config", "tiny", f"data.path={corpus}", f"out_dir={run}", "data.vocab=bytes",
                          "train.max_iters=60", "train.sample_tokens=0")
    assert trained.returncode == 0, trained.stderr
    elsewhere = tmp_path / "exports"
    elsewhere.mkdir()
    for mode, group in (("int8", "64"), ("int4", "32"), ("bf16", "64")):
        out = elsewhere / f"q_{mode}.pt"
        made = gptcore_here(capsys, "quantize", "--ckpt", run / "ckpt.pt", "--mode", mode, "--group-size", group,
                            "--out", out, "--device", "cpu", *REPORT_FLAGS)
        assert made.returncode == 0, made.stderr
        report = json.loads(out.with_suffix(".json").read_text())
        assert abs(report["eval"]["loss_change_pct"]) < 5
        sampled = gptcore_here(capsys, "sample", "--ckpt", out, "--prompt", "the ", "--tokens", "20", "--seed", "1")
        assert sampled.returncode == 0 and sampled.stdout.startswith("the "), sampled.stderr
        evaluated = gptcore_here(capsys, "eval", "--ckpt", out, "--data", corpus, "--json")
        assert evaluated.returncode == 0, evaluated.stderr
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("ckpt")) == ["ckpt.pt"]  # nothing beside it
    refused = gptcore_here(capsys, "quantize", "--ckpt", run / "ckpt.pt", "--mode", "int8", "--out", run / "ckpt.pt")
    assert_one_line_error(refused, 2, "would overwrite the input checkpoint")


def test_quantized_weights_in_fp32_compute_what_the_kernels_compute(quantized):
    """sample may run an int8/int4 file as its weights dequantized to fp32 (faster where they fit in
    cache): the same numbers, up to the bf16 rounding of activations the kernels do."""
    from gptcore.checkpointing.sharded import open_checkpoint
    from gptcore.inference.generate import fastest_form, load_model
    from gptcore.inference.quantize import dequantized_model

    for mode in ("int8", "int4"):
        state = open_checkpoint(quantized[mode][0])
        loaded = load_model(quantized[mode][0], "cpu", state)
        x = torch.randint(0, loaded.config.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            kernels, _ = loaded.model(x, x)
            fp32, _ = dequantized_model(state, loaded.config)(x, x)
        torch.testing.assert_close(fp32, kernels, atol=0.05, rtol=0.02)
        chosen = fastest_form(loaded, state)
        assert chosen.kind == mode and chosen.runs_as.startswith(("weights in fp32", f"{mode} kernels")), chosen.runs_as
        in_fp32 = isinstance(chosen.model.transformer.h[0].mlp.c_fc, torch.nn.Linear)
        assert in_fp32 == chosen.runs_as.startswith("weights in fp32") == (chosen.weights == "fp32")
        # Asked for by name, each form is what runs, and the line says how to repeat it.
        for form, says in (("fp32", "weights in fp32"), ("quantized", f"{mode} kernels")):
            sampled = run_gptcore("sample", "--ckpt", quantized[mode][0], "--prompt", "The ", "--tokens", "20",
                                  "--seed", "3", "--weights", form)
            assert sampled.returncode == 0 and f"{mode} ({says})" in sampled.stderr, sampled.stderr
            assert f"--seed 3 --weights {form} repeats it" in sampled.stderr



@pytest.mark.parametrize("preset", ["tiny", "fast"])
def test_the_expected_layout_is_what_the_quantizer_stores(preset):
    """The loader checks files against a layout worked out from shapes; it must be the quantizer's."""
    import dataclasses

    from gptcore.inference.quantize import expected_layout, quantize_weights

    model = dataclasses.replace(load_config(preset).model, vocab_size=65)
    for mode, group in (("int8", 64), ("int4", 32), ("bf16", 64)):
        weights = GPT(model).state_dict()
        stored = quantize_weights(weights, mode, group, model.tie_head)
        assert expected_layout(weights, model, mode, group) == {name: (t.shape, t.dtype) for name, t in stored.items()}
