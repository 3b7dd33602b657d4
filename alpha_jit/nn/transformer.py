"""A GPT: norms, MLPs, causal self-attention (MHA/GQA, learned positions or RoPE), the model.

Everything is built from IR ops, so the whole model differentiates through the ops' VJP rules
and fuses like any other graph. Initialisation follows nanoGPT (normal(0, 0.02), residual
projections scaled by 1/sqrt(2 * n_layer), zero biases) and the LM head is tied to the token
embedding.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from alpha_jit.nn import functional as F
from alpha_jit.nn.containers import ModuleList
from alpha_jit.nn.layers import Embedding, LayerNorm, Linear, RMSNorm, rng
from alpha_jit.nn.module import Module
from alpha_jit.tensor import Tensor, as_tensor, concat


@dataclass
class GPTConfig:
    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    n_kv_head: int | None = None  # None: = n_head (MHA); fewer: grouped-query attention
    bias: bool = True
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu (4x wide) | swiglu (8/3 x wide, rounded to a multiple of 64)
    pos: str = "learned"  # learned | rope
    dropout: float = 0.0  # applied in train() mode only
    rope_base: float = 10000.0
    tie_weights: bool = True  # the LM head is the token embedding (GPT-2); False: lm_head
    norm_eps: float | None = None  # None: 1e-5 for layernorm, 1e-6 for rmsnorm
    mlp_hidden: int | None = None  # None: 4 x n_embd (gelu), 8/3 x rounded to 64 (swiglu)

    def hidden(self) -> int:
        """The MLP's hidden width."""
        if self.mlp_hidden is not None:
            return int(self.mlp_hidden)
        if self.mlp == "swiglu":
            return int(math.ceil(8 * self.n_embd / 3 / 64) * 64)
        return 4 * self.n_embd

    def eps(self) -> float:
        """The norms' epsilon."""
        if self.norm_eps is not None:
            return float(self.norm_eps)
        return 1e-6 if self.norm == "rmsnorm" else 1e-5

    def to_dict(self) -> dict:
        return asdict(self)


# the two benchmark shapes (issue 3): keep them in this one place
CONFIGS = {
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=256, batch=64),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, batch=8),
}


def _normal(shape: tuple, std: float) -> np.ndarray:
    return rng().normal(0.0, std, shape).astype(np.float32)


def norm(cfg: GPTConfig, dim: int) -> Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, eps=cfg.eps())
    if cfg.norm != "layernorm":
        raise ValueError(f"GPTConfig.norm must be 'layernorm' or 'rmsnorm', got {cfg.norm!r}")
    return LayerNorm(dim, eps=cfg.eps(), bias=cfg.bias)


class MLP(Module):
    """GELU MLP or SwiGLU (silu(x W1) * (x W3)) W2, `cfg.hidden()` wide."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        c = cfg.n_embd
        self.kind = cfg.mlp
        hidden = cfg.hidden()
        if cfg.mlp == "swiglu":
            self.w1 = Linear(c, hidden, bias=cfg.bias)
            self.w3 = Linear(c, hidden, bias=cfg.bias)
            self.proj = Linear(hidden, c, bias=cfg.bias)
        elif cfg.mlp == "gelu":
            self.fc = Linear(c, hidden, bias=cfg.bias)
            self.proj = Linear(hidden, c, bias=cfg.bias)
        else:
            raise ValueError(f"GPTConfig.mlp must be 'gelu' or 'swiglu', got {cfg.mlp!r}")
        self.dropout = cfg.dropout

    def forward(self, x: Any) -> Tensor:
        if self.kind == "swiglu":
            a = self.w1(x)
            h = a * F.sigmoid(a) * self.w3(x)
        else:
            h = F.gelu(self.fc(x), approximate="tanh")  # GPT-2's form
        return F.dropout(self.proj(h), self.dropout, self.training)


def rope_tables(block: int, head_dim: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [block, head_dim] for rotate-half RoPE (each frequency used for both halves)."""
    inv = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    ang = np.arange(block, dtype=np.float64)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


class CausalSelfAttention(Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
        self.n_head = cfg.n_head
        self.n_kv = cfg.n_kv_head or cfg.n_head
        if self.n_head % self.n_kv:
            raise ValueError(f"n_head {cfg.n_head} is not a multiple of n_kv_head {self.n_kv}")
        self.hd = cfg.n_embd // cfg.n_head
        c = cfg.n_embd
        self.q = Linear(c, c, bias=cfg.bias)
        self.k = Linear(c, self.n_kv * self.hd, bias=cfg.bias)
        self.v = Linear(c, self.n_kv * self.hd, bias=cfg.bias)
        self.proj = Linear(c, c, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.rope = cfg.pos == "rope"
        if self.rope:
            cos, sin = rope_tables(cfg.block_size, self.hd, cfg.rope_base)
            # constant tables live on the device like parameters, but get no gradient and
            # stay out of state_dict (PyTorch's non-persistent buffers)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def _rotate(self, x: Tensor, t: int) -> Tensor:
        """RoPE on [B, T, H, hd]: x*cos + rotate_half(x)*sin."""
        half = self.hd // 2
        cos = self.rope_cos[:t].reshape(1, t, 1, self.hd)
        sin = self.rope_sin[:t].reshape(1, t, 1, self.hd)
        rot = concat([-x[:, :, :, half:], x[:, :, :, :half]], axis=-1)
        return x * cos + rot * sin

    def forward(self, x: Any) -> Tensor:
        x = as_tensor(x)
        b, t, c = x.shape
        q = self.q(x).reshape(b, t, self.n_head, self.hd)
        k = self.k(x).reshape(b, t, self.n_kv, self.hd)
        v = self.v(x).reshape(b, t, self.n_kv, self.hd)
        if self.rope:
            q, k = self._rotate(q, t), self._rotate(k, t)
        q, k, v = (z.permute(0, 2, 1, 3) for z in (q, k, v))  # [B, H or Hkv, T, hd]
        # one fused attention op (GQA inside: kv head h // (n_head / n_kv) serves query head h)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           scale=1.0 / math.sqrt(self.hd),
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.permute(0, 2, 1, 3).reshape(b, t, c)
        return F.dropout(self.proj(y), self.dropout, self.training)


class Block(Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: Any) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = Embedding(cfg.block_size, cfg.n_embd) if cfg.pos == "learned" else None
        self.blocks = ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = norm(cfg, cfg.n_embd)
        self.lm_head = None if cfg.tie_weights else Linear(cfg.n_embd, cfg.vocab_size,
                                                           bias=False)
        self.dropout = cfg.dropout
        self._init_weights()
        self.name_parameters()

    def _init_weights(self) -> None:
        proj_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                p.assign(_normal(p.shape, proj_std))
            elif name.endswith(".weight") and len(p.shape) == 2:
                p.assign(_normal(p.shape, 0.02))
            elif name.endswith(".bias"):
                p.assign(np.zeros(p.shape, np.float32))

    def num_params(self) -> int:
        return sum(int(np.prod(p.shape)) for p in self.parameters())

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """nanoGPT's split: decay matrices and embeddings, not biases or norm weights."""
        params = self.parameters()
        return [{"params": [p for p in params if len(p.shape) >= 2],
                 "weight_decay": weight_decay},
                {"params": [p for p in params if len(p.shape) < 2], "weight_decay": 0.0}]

    def forward(self, idx: Any, targets: Any = None) -> tuple[Tensor, Tensor | None]:
        """(logits [B, T, vocab], loss or None), as nanoGPT."""
        idx = as_tensor(idx)
        b, t = idx.shape
        if t > self.config.block_size:
            from alpha_jit.errors import ShapeError
            from alpha_jit.ir import trace

            raise ShapeError("GPT", f"sequence length {t} exceeds block_size "
                             f"{self.config.block_size} (input shape {idx.shape})",
                             trace.current().provenance().where())
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe.weight[:t]
        x = F.dropout(x, self.dropout, self.training)
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_f(x)
        head = self.wte.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(x, head)
        if targets is None:
            return logits, None
        v = self.config.vocab_size
        loss = F.cross_entropy(logits.reshape(b * t, v), as_tensor(targets).reshape(b * t))
        return logits, loss
