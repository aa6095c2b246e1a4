"""A decoder-only GPT, GPT-2 style, with a KV cache for generation.

Token + position embeddings, pre-norm blocks (fused-QKV causal attention through
scaled_dot_product_attention, GELU MLP), a final LayerNorm and an LM head tied to the token
embedding. The model knows nothing of ranks, devices or checkpoints: the trainer brings those.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptcore.config import ModelConfig


class KVCache:
    """Keys and values of the tokens seen so far, preallocated for the whole context window so
    that each generated token writes one slot instead of concatenating tensors."""

    def __init__(self, n_layer: int, batch: int, n_head: int, block_size: int, head_dim: int, device, dtype):
        shape = (batch, n_head, block_size, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            # Prefill fills an empty cache (causal over T tokens); each later step adds one token
            # that may attend to everything cached, so it needs no mask.
            assert T == 1 or cache.length == 0, "prefill only into an empty cache"
            k, v = cache.append(layer, k, v)
        y = self.attend(q, k, v, causal=T > 1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        if q.is_cpu and q.dtype == torch.bfloat16 and torch.is_grad_enabled():
            # PyTorch's CPU flash attention runs forward as fast in bf16 as in fp32, but its backward
            # 2-4x slower (bench/bench_attention.py): under CPU autocast, training keeps attention
            # in fp32 and only the matmuls around it in bf16.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout,
                                                   is_causal=causal)
            return y.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.vocab_size > 0, "vocab_size comes from the data"
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled down by depth so the residual stream's variance
        # does not grow with the number of layers.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, without the position embedding by default (it costs no matmul FLOPs)."""
        count = sum(p.numel() for p in self.parameters())
        return count - self.transformer.wpe.weight.numel() if non_embedding else count

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N for the weights plus the attention
        scores and mixing, 12 * layers * n_embd * seq_len (PaLM appendix B)."""
        T = seq_len or self.config.block_size
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * T

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None):
        T = idx.size(1)
        start = cache.length if cache is not None else 0
        assert start + T <= self.config.block_size, "sequence longer than block_size"
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None  # generation needs only the last position
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def new_cache(self, batch: int, device, dtype) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, batch, c.n_head, c.block_size, c.n_embd // c.n_head, device, dtype)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T).

        The context is a window of at most block_size tokens. When it is full it slides forward
        by half a block, so the cache is rebuilt once every block_size/2 tokens rather than on
        every token; without the cache each token recomputes the same window from scratch, which
        is what makes the two paths comparable token for token."""
        window = self.config.block_size
        keep = max(1, window // 2)
        start = max(0, idx.size(1) - window)
        cache = None
        for _ in range(max_new_tokens):
            if idx.size(1) - start > window:
                start = idx.size(1) - keep
                cache = None
            if not use_cache:
                logits, _ = self(idx[:, start:])
            elif cache is None:
                # ln_f keeps the activation dtype even when the matrices are stored quantized.
                cache = self.new_cache(idx.size(0), idx.device, self.transformer.ln_f.weight.dtype)
                logits, _ = self(idx[:, start:], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            idx = torch.cat((idx, sample_next(logits[:, -1, :], temperature, top_k, generator)), dim=1)
        return idx


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
