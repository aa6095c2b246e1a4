"""A decoder-only GPT, GPT-2 style, with a KV cache for generation.

Token + position embeddings, pre-norm blocks (fused-QKV causal attention through
scaled_dot_product_attention, GELU MLP), a final LayerNorm and an LM head tied to the token
embedding. The model knows nothing of ranks, devices or checkpoints: the trainer brings those.

The block options of ModelConfig (off by default, so a default model is GPT-2 and exports as
such) are the ones the modded-nanogpt speedruns found to cut the steps to a given loss: rotary
positions instead of the table, RMSNorm, QK-norm, a ReLU² MLP, an untied head, output
projections that start at zero, and tanh soft-capping of the logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptcore.config import ModelConfig


def parameter_count(config: ModelConfig) -> int:
    """GPT(config)'s parameters counted from the shape alone (the tied head once): how large a
    model a config or a checkpoint's header describes, known before anything is built."""
    C, bias = config.n_embd, config.bias
    norm = C * (2 if bias and config.norm == "layernorm" else 1)
    per_layer = 12 * C * C + 2 * norm + (9 * C if bias else 0)  # qkv 3C, proj C, fc 4C, proj C
    positions = config.block_size * C if config.position == "learned" else 0
    head = 0 if config.tie_head else config.vocab_size * C
    return config.n_layer * per_layer + config.vocab_size * C + positions + head + norm


def rotary_angles(pos: torch.Tensor, head_size: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_size / 2) of RoPE's angles for the positions `pos`, computed from the
    positions themselves (no table), so a KV-cache step at position p rotates exactly as p did in
    a whole-window forward."""
    inv_freq = base ** -(torch.arange(0, head_size, 2, device=pos.device, dtype=torch.float32) / head_size)
    angles = pos.float()[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B, heads, T, head_size) rotated by position, pairing channel i with i + head_size/2 (the
    GPT-NeoX and Llama layout, llama.cpp's "neox" rope), in fp32, returned in x's dtype."""
    cos, sin = rope
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dimension in fp32, returned in x's dtype."""
    w = weight.float() if weight is not None else None
    return F.rms_norm(x.float(), (x.size(-1),), w, eps).to(x.dtype)


DROPOUT_LEVELS = 2**15  # a CPU dropout draw: 15 random bits


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout. On the CPU it is what PyTorch's CPU dropout does (x times a mask in x's dtype,
    each element 1 / (1 - p) with probability 1 - p, else 0), but with cheaper random numbers:
    PyTorch's bernoulli_ takes 3x as long as rand for as many (pytorch/pytorch#138199), and was
    45% of a CPU training step with dropout 0.2; rand, one Mersenne Twister draw per element,
    still took a third of it. Here one 64-bit draw serves four elements, 15 bits each (the top
    lane's sign bit is always 0): p is rounded to 1/32768 and the scale is exact for that p, so
    the mask's mean is 1. Elsewhere PyTorch's own: a fused kernel on CUDA, and under torch.compile
    inductor's own random numbers, fused into the kernel (dynamo cannot trace random_)."""
    if not (training and x.is_cpu and 0.0 < p < 1.0) or torch.compiler.is_compiling():
        return F.dropout(x, p, training)
    dropped = min(round(p * DROPOUT_LEVELS), DROPOUT_LEVELS - 1)  # of DROPOUT_LEVELS equally likely draws
    lanes = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_()
    draws = lanes.view(torch.int16)[: x.numel()].view(x.shape).bitwise_and_(DROPOUT_LEVELS - 1)
    return x * draws.ge(dropped).to(x.dtype).mul_(DROPOUT_LEVELS / (DROPOUT_LEVELS - dropped))


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


# Up to this many tokens, CPU training under autocast writes attention out (bench/bench_attention.py).
MATMUL_ATTENTION_MAX_TOKENS = 512


def attention_by_matmul(v: torch.Tensor, dropout: float) -> bool:
    """Whether attention runs as matmul_attention rather than scaled_dot_product_attention, in
    CPU training (bench/bench_attention.py):
    - with dropout, at any length and dtype: PyTorch's CPU flash kernels have no dropout, so it
      takes its math path, which writes the scores out as well, with a bernoulli_ mask;
    - without, under autocast up to MATMUL_ATTENTION_MAX_TOKENS: there the CPU flash attention's
      bf16 backward is 2-4x slower than its fp32 one, and bf16 matmuls beat both; beyond, bf16
      flash attention is the fastest of the three."""
    return v.is_cpu and torch.is_grad_enabled() and (
        dropout > 0 or (v.dtype == torch.bfloat16 and v.size(-2) <= MATMUL_ATTENTION_MAX_TOKENS))


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """Causal attention written out: the scores, their softmax (dropped out), the weighted values."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return fast_dropout(scores.masked_fill(~causal, float("-inf")).softmax(dim=-1), dropout) @ v


class KVCache:
    """Keys and values for every position of the context window, allocated once and written at the
    positions a tensor names (gpt-fast's static cache). A decode step then has the same shapes and
    the same addresses every time, which is what torch.compile and CUDA graphs need; the causal
    mask row of a position says which cached keys it may see, so stale slots never leak in."""

    def __init__(self, config: ModelConfig, batch: int, device, dtype):
        shape = (config.n_layer, batch, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.causal = torch.ones(config.block_size, config.block_size, dtype=torch.bool, device=device).tril()
        # The one-token step's input: a slice of the output would have a stride that depends on the
        # length generated, and a compiled step would be recompiled for every length.
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)

    def update(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.keys[layer].index_copy_(2, pos, k)
        self.values[layer].index_copy_(2, pos, v)
        return self.keys[layer], self.values[layer]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                pos: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        if rope is not None:
            q, k = rotate(q, rope), rotate(k, rope)
        if cache is None:
            y = self.attend(q, k, v)
        else:
            k, v = cache.update(layer, pos, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.causal[pos])
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dropout = self.dropout if self.training else 0.0
        if attention_by_matmul(v, dropout):
            return matmul_attention(q, k, v, dropout)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the activations' dtype, and returned in theirs: a model
    stored in bf16 keeps its norms (a few KB) in fp32, so that evaluating it measures the bf16
    matrices, not the rounding of the statistics. Under autocast this is what PyTorch does anyway."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain, computed in fp32 as LayerNorm above is."""

    def __init__(self, n_embd: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    return RMSNorm(config.n_embd) if config.norm == "rmsnorm" else LayerNorm(config.n_embd, bias=config.bias)


class ReLUSquared(torch.autograd.Function):
    """relu(h)², its backward grad·relu(h)·2 in two passes over the (B, T, 4C) activations (the
    saved relu(h) is zero wherever h is), where autograd's relu(h).square() takes four. The same
    numbers, bit for bit; a few % off an eager CPU step of the `fast` preset (BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        r = F.relu(h)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (r,) = ctx.saved_tensors
        return torch.mul(grad, r).mul_(2)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)
        self.relu2 = config.mlp == "relu2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        h = ReLUSquared.apply(h) if self.relu2 else F.gelu(h)
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                pos: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, pos, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig, init_weights: bool = True):
        """init_weights=False leaves torch's default initialization, for a model whose weights are
        all about to be loaded: GPT-2's is two more passes of random numbers over every weight."""
        super().__init__()
        assert config.vocab_size > 0, "vocab_size comes from the data"
        self.config = config
        positions = {"wpe": nn.Embedding(config.block_size, config.n_embd)} if config.position == "learned" else {}
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            **positions,
            drop=Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_head:
            self.lm_head.weight = self.transformer.wte.weight
        if init_weights:
            self.apply(self._init_weights)
            # GPT-2: residual projections scaled down by depth so the residual stream's variance
            # does not grow with the number of layers; or zero, so that every block starts as the
            # identity (modded-nanogpt).
            for name, param in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    std = 0.0 if config.zero_init_proj else 0.02 / math.sqrt(2 * config.n_layer)
                    nn.init.normal_(param, mean=0.0, std=std)
        self._decode_steps = {}  # compiled one-token steps, by torch.compile mode
        self._kv_cache: KVCache | None = None

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
        if non_embedding and "wpe" in self.transformer:
            count -= self.transformer.wpe.weight.numel()
        return count

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N for the weights plus the attention
        scores and mixing, 12 * layers * n_embd * seq_len (PaLM appendix B)."""
        T = seq_len or self.config.block_size
        return 6 * self.num_params() + 12 * self.config.n_layer * self.config.n_embd * T

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                pos: torch.Tensor | None = None):
        """Logits (and the loss against targets). With a cache, `pos` holds the positions of idx's
        tokens in the window, and their keys and values are written there."""
        T = idx.size(1)
        assert T <= self.config.block_size, "sequence longer than block_size"
        if pos is None:
            pos = torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx)
        rope = None
        if self.config.position == "rotary":
            rope = rotary_angles(pos, self.config.n_embd // self.config.n_head)
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer, pos, rope)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.head(x[:, -1:, :]), None  # generation needs only the last position
        logits = self.head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits.float() / cap) if cap else logits

    def activation_dtype(self, device) -> torch.dtype:
        """What the embeddings hand the blocks: the weights' dtype, or fp32 for quantized tables."""
        return self.transformer.wte(torch.zeros(1, 1, dtype=torch.long, device=device)).dtype

    def kv_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        """The model's cache, reused by every generation of the same batch, device and dtype: a
        compiled step is specialized to its tensors' addresses (and a CUDA graph records them)."""
        cache = self._kv_cache
        if cache is None or (cache.keys.size(1), cache.keys.device, cache.keys.dtype) != (batch, device, dtype):
            self._kv_cache = cache = KVCache(self.config, batch, device, dtype)
        return cache

    def decode_step(self, token: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits after one token at position `pos` (a 1-element tensor), cached keys before it."""
        return self(token, cache=cache, pos=pos)[0]

    def compiled_decode_step(self, device: torch.device):
        """decode_step through torch.compile, built once per mode: CUDA graphs on a GPU
        ("reduce-overhead": one replay per token, no kernel launches from Python)."""
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        if mode not in self._decode_steps:
            self._decode_steps[mode] = torch.compile(self.decode_step, mode=mode, fullgraph=True)
        return self._decode_steps[mode]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True, compile: bool = False) -> torch.Tensor:
        """idx (B, T) followed by max_new_tokens sampled tokens.

        The context is a window of at most block_size tokens. When it is full it slides forward
        by half a block, and the cache is refilled from the tokens kept, once every block_size/2
        tokens rather than on every token; without the cache each token recomputes the same
        window from scratch, which is what makes the two paths comparable token for token.
        Tokens are written into one preallocated tensor and never read back on the host, so a
        GPU runs ahead of Python. `compile` runs the one-token step through torch.compile."""
        B, prompt = idx.shape
        window, device = self.config.block_size, idx.device
        keep = max(1, window // 2)
        out = torch.empty(B, prompt + max_new_tokens, dtype=torch.long, device=device)
        out[:, :prompt] = idx
        start = max(0, prompt - window)  # the window's first token
        cache, pos, refill = None, None, True
        if use_cache:
            cache = self.kv_cache(B, device, self.activation_dtype(device))
            step = self.compiled_decode_step(device) if compile else self.decode_step
            if compile:
                for tensor in (cache.keys, cache.values, cache.causal, cache.token):
                    torch._dynamo.mark_static_address(tensor)  # CUDA graphs read them in place
        for t in range(prompt, prompt + max_new_tokens):
            if t - start > window:
                start, refill = t - keep, True
            if not use_cache:
                logits, _ = self(out[:, start:t])
            elif refill:
                filled = t - start
                logits, _ = self(out[:, start:t], cache=cache, pos=torch.arange(filled, device=device))
                pos, refill = torch.full((1,), filled, dtype=torch.long, device=device), False
            else:
                cache.token.copy_(out[:, t - 1:t])
                logits = step(cache.token, pos, cache)
                pos += 1
            out[:, t] = sample_next(logits[:, -1, :], temperature, top_k, generator)[:, 0]
        return out


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row: argmax at temperature 0, else a draw from softmax(logits / temperature)
    over the top_k. The draw is argmax(p / E) with E ~ Exp(1) per entry, which picks index i with
    probability p_i, as torch.multinomial does, without its host synchronization on a GPU."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1, keepdim=True)
