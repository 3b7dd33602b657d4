"""`TorchGPT`: the PyTorch twin of `alpha_jit.nn.GPT`, for parity tests and for the benchmark.

Why one twin: the parity tests (tests/nn/test_torch_parity.py) and `alpha-jit bench` must compare
alpha_jit with the *same* model, so there is exactly one PyTorch re-implementation of
`alpha_jit/nn/transformer.py`. It covers every option of `GPTConfig` (layernorm | rmsnorm,
gelu(tanh) | swiglu, learned positions | RoPE, MHA | GQA, bias on/off, the tied LM head), names
its parameters exactly as alpha_jit's `model.named_parameters()` does, and loads the alpha_jit
model's weights (`load_alpha(model)`), so both start from the same numbers.

Attention comes in two spellings:
- "math": q @ k^T, a masked softmax, @ v, op for op as alpha_jit records it; the parity tests
  use it (the same summation structure keeps float32 differences at round-off);
- "sdpa": `F.scaled_dot_product_attention(is_causal=True)`, the fused kernel nanoGPT and PyTorch
  users run; the benchmark times this one.

This module imports torch at the top: import it only where torch is installed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from alpha_jit.nn.transformer import GPTConfig, rope_tables

ATTENTION = ("math", "sdpa")


class RMSNorm(nn.Module):
    """x / rms(x) * weight, eps 1e-6 inside the square root (alpha_jit's RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def make_norm(cfg: GPTConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, eps=cfg.eps())
    if cfg.norm != "layernorm":
        raise ValueError(f"GPTConfig.norm must be 'layernorm' or 'rmsnorm', got {cfg.norm!r}")
    return nn.LayerNorm(dim, eps=cfg.eps(), bias=cfg.bias)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        c = cfg.n_embd
        self.kind = cfg.mlp
        hidden = cfg.hidden()
        if cfg.mlp == "swiglu":
            self.w1 = nn.Linear(c, hidden, bias=cfg.bias)
            self.w3 = nn.Linear(c, hidden, bias=cfg.bias)
            self.proj = nn.Linear(hidden, c, bias=cfg.bias)
        elif cfg.mlp == "gelu":
            self.fc = nn.Linear(c, hidden, bias=cfg.bias)
            self.proj = nn.Linear(hidden, c, bias=cfg.bias)
        else:
            raise ValueError(f"GPTConfig.mlp must be 'gelu' or 'swiglu', got {cfg.mlp!r}")
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            h = F.silu(self.w1(x)) * self.w3(x)
        else:
            h = F.gelu(self.fc(x), approximate="tanh")
        return self.drop(self.proj(h))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, attention: str):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
        self.n_head = cfg.n_head
        self.n_kv = cfg.n_kv_head or cfg.n_head
        if self.n_head % self.n_kv:
            raise ValueError(f"n_head {cfg.n_head} is not a multiple of n_kv_head {self.n_kv}")
        self.hd = cfg.n_embd // cfg.n_head
        c = cfg.n_embd
        self.q = nn.Linear(c, c, bias=cfg.bias)
        self.k = nn.Linear(c, self.n_kv * self.hd, bias=cfg.bias)
        self.v = nn.Linear(c, self.n_kv * self.hd, bias=cfg.bias)
        self.proj = nn.Linear(c, c, bias=cfg.bias)
        self.attention = attention
        self.dropout = cfg.dropout
        self.drop = nn.Dropout(cfg.dropout)
        self.rope = cfg.pos == "rope"
        if self.rope:  # the same float32 tables alpha_jit computes (buffers, not parameters)
            cos, sin = rope_tables(cfg.block_size, self.hd, cfg.rope_base)
            self.register_buffer("rope_cos", torch.from_numpy(cos), persistent=False)
            self.register_buffer("rope_sin", torch.from_numpy(sin), persistent=False)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE on [B, T, H, hd]: x*cos + rotate_half(x)*sin."""
        t, hd = x.shape[1], x.shape[-1]
        cos = self.rope_cos[:t].reshape(1, t, 1, hd)
        sin = self.rope_sin[:t].reshape(1, t, 1, hd)
        rot = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1)
        return x * cos + rot * sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.n_head, self.hd)
        k = self.k(x).view(b, t, self.n_kv, self.hd)
        v = self.v(x).view(b, t, self.n_kv, self.hd)
        if self.rope:
            q, k = self._rotate(q), self._rotate(k)
        if self.n_kv != self.n_head:  # GQA: query head i reads kv head i // (n_head / n_kv)
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=2)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, H, T, hd]
        if self.attention == "sdpa":
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.hd))
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            att = self.drop(att.masked_fill(~causal, float("-inf")).softmax(-1))
            y = att @ v
        y = y.transpose(1, 2).reshape(b, t, c)
        return self.drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, attention: str):
        super().__init__()
        self.ln1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg, attention)
        self.ln2 = make_norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TorchGPT(nn.Module):
    """`alpha_jit.nn.GPT` in PyTorch. Parameters are created uninitialised-but-finite (PyTorch's
    defaults); call `load_alpha(model)` or `load_arrays(...)` to start from alpha_jit's weights.
    Dropout masks cannot match alpha_jit's counter-based ones: parity needs dropout 0."""

    def __init__(self, cfg: GPTConfig, attention: str = "sdpa"):
        super().__init__()
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        if cfg.pos not in ("learned", "rope"):
            raise ValueError(f"GPTConfig.pos must be 'learned' or 'rope', got {cfg.pos!r}")
        self.config = cfg
        self.attention = attention
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, attention) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg, cfg.n_embd)
        self.lm_head = None if cfg.tie_weights else nn.Linear(cfg.n_embd, cfg.vocab_size,
                                                              bias=False)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe.weight[:t]
        x = self.drop(x)
        for blk in self.blocks:
            x = blk(x)
        head = self.wte.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(self.ln_f(x), head)
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(b * t, -1), targets.reshape(b * t))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- weights from alpha_jit ------------------------------------------------------------
    def load_arrays(self, arrays: dict[str, np.ndarray]) -> TorchGPT:
        """Copy `{alpha_jit parameter name: array}` into this model, which must have exactly
        those names and shapes (a mismatch raises naming every differing parameter)."""
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(arrays))
        extra = sorted(set(arrays) - set(own))
        bad = [f"{n}: alpha_jit {tuple(arrays[n].shape)}, torch {tuple(own[n].shape)}"
               for n in sorted(set(own) & set(arrays))
               if tuple(arrays[n].shape) != tuple(own[n].shape)]
        if missing or extra or bad:
            raise ValueError("TorchGPT and the alpha_jit GPT differ: "
                             + "; ".join(filter(None, [
                                 f"only in torch: {missing}" if missing else "",
                                 f"only in alpha_jit: {extra}" if extra else "",
                                 f"shapes: {bad}" if bad else ""])))
        with torch.no_grad():
            for name, p in own.items():
                src = torch.from_numpy(np.array(arrays[name], dtype=np.float32, order="C"))
                p.copy_(src.to(p.device))
        return self

    def load_alpha(self, model: Any) -> TorchGPT:
        """Copy an `alpha_jit.nn.GPT`'s current weights (read back from the device if needed)."""
        return self.load_arrays({name: p.numpy() for name, p in model.named_parameters()})


def from_alpha(model: Any, attention: str = "sdpa") -> TorchGPT:
    """A float32 CPU TorchGPT with the architecture and current weights of `model`."""
    return TorchGPT(model.config, attention).load_alpha(model)


def optim_groups(model: TorchGPT, weight_decay: float) -> list[dict[str, Any]]:
    """nanoGPT's (and alpha_jit's `GPT.optim_groups`) split: matrices and embeddings decay,
    biases and norm weights do not."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
