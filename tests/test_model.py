"""The model: shapes, parameter count, mixed-precision gradients, and KV-cache generation equal to full
recomputation."""

import pytest
import torch
import torch.nn.functional as F

from gptcore.config import ModelConfig
from gptcore.models.gpt import (GPT, MATMUL_ATTENTION_MAX_TOKENS, KVCache, attention_by_matmul, fast_dropout,
                                matmul_attention, parameter_count)


def tiny_model(block_size=16, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, dropout=0.0,
                           vocab_size=11)).eval()


def test_loss_at_init_is_near_uniform():
    model = tiny_model()
    x, y = torch.randint(0, 11, (2, 4, 16))
    logits, loss = model(x, y)
    assert logits.shape == (4, 16, 11)
    assert abs(loss.item() - torch.log(torch.tensor(11.0)).item()) < 0.2


def test_head_is_tied_and_no_mask_buffers_are_saved():
    model = tiny_model()
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert not list(model.buffers())
    assert all(not key.endswith(".bias") or "ln" not in key for key in model.state_dict())


def test_seed_shape_parameter_count_and_flops():
    model = GPT(ModelConfig(n_layer=8, n_head=8, n_embd=512, block_size=512, vocab_size=84))
    per_layer = 12 * 512 * 512 + 2 * 512  # attention + MLP matrices, two LayerNorm weights
    assert model.num_params() == 8 * per_layer + 84 * 512 + 512
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 8 * 512 * 512


def test_kv_cache_generation_equals_full_recomputation():
    """Past block_size the window slides: the cached path must still pick the same tokens."""
    model = tiny_model(block_size=16, seed=1)
    prompt = torch.tensor([[1, 2, 3]])
    for temperature, top_k in ((1.0, None), (0.8, 5), (0.0, None)):
        outs = []
        for use_cache in (True, False):
            generator = torch.Generator().manual_seed(7)
            outs.append(model.generate(prompt, 60, temperature=temperature, top_k=top_k,
                                       generator=generator, use_cache=use_cache))
        assert outs[0].shape == (1, 63)
        assert torch.equal(outs[0], outs[1]), (temperature, top_k)


def test_cached_logits_match_uncached_logits():
    model = tiny_model(block_size=16, seed=2)
    idx = torch.randint(0, 11, (2, 10))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, idx.device, torch.float32)
    model(idx[:, :6], cache=cache, pos=torch.arange(6))
    for t in range(6, 10):
        step = model.decode_step(idx[:, t:t + 1], torch.tensor([t]), cache)
        reference, _ = model(idx[:, :t + 1])
        torch.testing.assert_close(step[:, -1], reference[:, -1], rtol=1e-5, atol=1e-5)
    assert full.shape == (2, 1, 11)


@pytest.mark.parametrize("tokens, options", [(32, {}), (32, {"qk_norm": True, "position": "rotary"}),
                                             (MATMUL_ATTENTION_MAX_TOKENS + 8, {})])
def test_bf16_autocast_training_gives_the_fp32_gradients_to_bf16_precision(tokens, options):
    """Attention written out (up to MATMUL_ATTENTION_MAX_TOKENS) and through bf16 flash attention
    (beyond), with and without the block options that touch queries and keys."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=tokens, vocab_size=50, dropout=0.0,
                            **options))
    x, y = torch.randint(0, 50, (4, tokens)), torch.randint(0, 50, (4, tokens))

    def gradients(autocast: bool) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, loss = model(x, y)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    exact, mixed = gradients(False), gradients(True)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    assert (mixed - exact).norm() / exact.norm() < 0.05


def test_cpu_training_writes_attention_out_under_autocast_up_to_its_token_limit_and_with_dropout_always():
    def values(tokens, dtype=torch.bfloat16):
        return torch.zeros(1, 2, tokens, 8, dtype=dtype)

    assert attention_by_matmul(values(MATMUL_ATTENTION_MAX_TOKENS), 0.0)
    assert not attention_by_matmul(values(MATMUL_ATTENTION_MAX_TOKENS + 1), 0.0)
    assert not attention_by_matmul(values(16, torch.float32), 0.0)
    # With dropout, PyTorch's CPU attention takes its math path: written out too, with a slower mask.
    assert attention_by_matmul(values(16, torch.float32), 0.1)
    assert attention_by_matmul(values(MATMUL_ATTENTION_MAX_TOKENS + 1), 0.1)
    with torch.no_grad():  # evaluation and sampling: no backward, and bf16 flash attention's forward is fast
        assert not attention_by_matmul(values(16), 0.0)
    q, k, v = torch.randn(3, 2, 4, 20, 8).unbind()
    torch.testing.assert_close(matmul_attention(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               rtol=1e-5, atol=1e-6)
    assert matmul_attention(q, k, v, dropout=1.0).abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_keeps_one_minus_p_of_the_elements_scaled_and_its_gradient_takes_the_same_mask(dtype):
    """fast_dropout draws its CPU mask from 15-bit lanes of random integers instead of PyTorch's
    bernoulli_: the same law, each element independent of its neighbours (four share a draw)."""
    torch.manual_seed(0)
    x = (torch.rand(1000, 1000) + 1).to(dtype).requires_grad_()  # in [1, 2]: zero only where dropped
    y = fast_dropout(x, 0.2)
    assert y.dtype == dtype
    kept = y != 0
    # 10^6 draws: the kept share's standard deviation is 4e-4, a pair's 5e-4.
    assert abs(kept.float().mean().item() - 0.8) < 2e-3
    for first, second in [(kept[:, :-1], kept[:, 1:]), (kept[:, :-4], kept[:, 4:]), (kept[:-1], kept[1:])]:
        assert abs((first & second).float().mean().item() - 0.64) < 3e-3
    torch.testing.assert_close(y[kept], x[kept].detach() * 1.25, atol=0, rtol=1e-4 if dtype == torch.float32 else 0)
    y.backward(torch.ones_like(y))
    scale = x.grad[kept].unique()  # the gradient takes the same mask and scale
    assert len(scale) == 1 and abs(scale.item() - 1.25) < 1e-4 and torch.equal(x.grad, kept.to(dtype) * scale)
    assert len(odd := fast_dropout(torch.ones(7, 3), 0.5).flatten()) == 21 and set(odd.tolist()) == {0.0, 2.0}
    compiled = torch.compile(fast_dropout, fullgraph=True, backend="eager")  # a compiled CPU step: no graph break
    assert abs((compiled(x.detach(), 0.2) != 0).float().mean().item() - 0.8) < 2e-3
    assert torch.equal(fast_dropout(x, 0.2, training=False), x) and torch.equal(fast_dropout(x, 0.0), x)
    assert fast_dropout(x, 1.0).abs().max() == 0


def test_the_compiled_decode_step_picks_the_same_tokens_as_eager():
    """torch.compile of the one-token step (CUDA graphs on a GPU) against the eager step, through
    a window slide, reusing the model's cache across calls."""
    model = tiny_model(block_size=16, seed=3)
    prompt = torch.tensor([[4, 5]])
    for temperature in (0.0, 0.9):
        outs = [model.generate(prompt, 40, temperature=temperature, top_k=6, compile=compiled,
                               generator=torch.Generator().manual_seed(11)) for compiled in (False, True, True)]
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2]), temperature


def test_parameters_are_counted_from_the_shape_alone():
    for bias in (False, True):
        config = ModelConfig(n_layer=3, n_head=2, n_embd=24, block_size=20, bias=bias, vocab_size=17)
        assert parameter_count(config) == sum(p.numel() for p in GPT(config).parameters())
