"""The column-major weights that CPU decoding loads: the same model, computing the same numbers
to float rounding, tied weights left tied, and files written from it unchanged."""

import copy

import torch

from conftest import run_gptcore
from gptcore.checkpointing.checkpoint import load
from gptcore.config import ModelConfig
from gptcore.inference.generate import load_model
from gptcore.inference.weight_layout import column_major_linears
from gptcore.models.gpt import GPT, KVCache


def small_model(tie_head: bool) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.0, vocab_size=40,
                           tie_head=tie_head)).eval()


def column_major(weight: torch.Tensor) -> bool:
    return weight.t().is_contiguous() and not weight.is_contiguous()


def test_column_major_weights_compute_what_row_major_ones_do():
    for tie_head in (True, False):
        row_major = small_model(tie_head)
        model = column_major_linears(copy.deepcopy(row_major))
        linears = {name: module.weight for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
        tied = {"lm_head"} if tie_head else set()
        assert all(column_major(weight) for name, weight in linears.items() if name not in tied)
        if tie_head:  # the lookup reads the embedding's rows: the head stays the embedding
            assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.is_contiguous()
        # The same numbers: every tensor equal, decode logits equal to rounding.
        reference = row_major.state_dict()
        assert all(torch.equal(tensor, reference[name]) for name, tensor in model.state_dict().items())
        idx = torch.randint(0, 40, (1, 12))
        caches = [KVCache(m.config, 1, idx.device, torch.float32) for m in (row_major, model)]
        for m, cache in zip((row_major, model), caches):
            m(idx[:, :4], cache=cache, pos=torch.arange(4))
        for t in range(4, 12):
            expected, got = (m.decode_step(idx[:, t:t + 1], torch.tensor([t]), cache)
                             for m, cache in zip((row_major, model), caches))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # A second pass changes nothing.
        assert all(column_major_linears(model).get_submodule(name).weight is weight for name, weight in linears.items())


def test_only_fp32_weights_change_layout():
    model = column_major_linears(small_model(tie_head=False).to(torch.bfloat16))
    assert all(module.weight.is_contiguous() for module in model.modules() if isinstance(module, torch.nn.Linear))


def test_a_checkpoint_sampled_on_the_cpu_decodes_from_column_major_weights(tmp_path, corpus):
    run_dir = tmp_path / "run"
    trained = run_gptcore("train", "--config", "tiny", "train.device=cpu", f"data.path={corpus}", f"out_dir={run_dir}",
                          "train.max_iters=10", "train.sample_tokens=0")
    assert trained.returncode == 0, trained.stderr
    loaded = load_model(run_dir / "ckpt.pt", "cpu")
    assert column_major(loaded.model.transformer.h[0].mlp.c_fc.weight)
    saved = load(run_dir / "ckpt.pt")["model"]
    assert all(torch.equal(tensor, saved[name]) for name, tensor in loaded.model.state_dict().items())
