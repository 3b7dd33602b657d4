"""The model shapes `alpha-jit bench` runs, and the model FLOPs of one training step.

Why here: the GEMM bench (shapes taken from the traced step) and the GPT step bench must agree on
what `small`, `gpt2` and `tiny` mean and on the batch each runs at. `small` and `gpt2` come from
`alpha_jit.nn.CONFIGS` (the one place the benchmark shapes live); `tiny` is a few-hundred-
thousand-parameter model that compiles and steps in seconds on lavapipe, for the tests.
A config is named `NAME` (its default batch) or `NAME@B` (batch B).

Model FLOPs per training step (the MFU numerator, nanoGPT's / PaLM's estimate):

    FLOPs = 6 * N * (B * T)  +  12 * L * H * hd * T^2 * B

N counts the parameters that take part in matrix multiplies: all of them, the tied token
embedding once (it is the LM head), minus the learned position table (an addition, not a
matmul). 6 = 2 (multiply-add) x 3 (forward, and twice that for the backward's two gradients).
The second term is attention's q @ k^T and att @ v over the full T x T scores (the causal mask
is not discounted, as in nanoGPT), forward and backward, H query heads of width hd in L layers.
Norms, softmax, the loss and the optimizer are not counted: MFU counts useful model FLOPs only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from alpha_jit.nn.transformer import CONFIGS, GPTConfig

# a seconds-long step on lavapipe: 2 layers, width 128, 64 tokens, 438k parameters
TINY = dict(vocab_size=256, block_size=64, n_layer=2, n_head=4, n_embd=128, batch=4)
DEFAULT_CONFIGS = ("small", "gpt2")


def known() -> dict[str, dict]:
    """Config name -> GPTConfig fields plus `batch`."""
    return {"tiny": TINY, **CONFIGS}


@dataclass(frozen=True)
class BenchConfig:
    """One model shape at one batch size: what a step row and its GEMM shapes are measured on."""

    name: str
    model: GPTConfig
    batch: int

    @property
    def label(self) -> str:
        return f"{self.name}@{self.batch}"

    @property
    def seq(self) -> int:
        return self.model.block_size  # the bench always runs full-length sequences

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def resolve(spec: str, batch: int | None = None) -> BenchConfig:
    """`NAME` or `NAME@B` -> BenchConfig; `batch` (the --batch option) overrides the default
    batch of a plain NAME. Raises ValueError naming the known configs."""
    name, _, b = spec.partition("@")
    table = known()
    if name not in table:
        raise ValueError(f"unknown config {name!r}: known configs are {sorted(table)} "
                         "(NAME or NAME@BATCH)")
    fields = dict(table[name])
    default_batch = int(fields.pop("batch"))
    fields.setdefault("dropout", 0.0)
    if b:
        if not b.isdigit() or int(b) < 1:
            raise ValueError(f"config {spec!r}: the batch after '@' must be a positive integer")
        chosen = int(b)
    else:
        chosen = batch if batch is not None else default_batch
    return BenchConfig(name, GPTConfig(**fields), chosen)


def count_params(cfg: GPTConfig) -> int:
    """Parameters of `alpha_jit.nn.GPT(cfg)` (tied head counted once), without building it."""
    c, hd = cfg.n_embd, cfg.n_embd // cfg.n_head
    kv = (cfg.n_kv_head or cfg.n_head) * hd
    bias = 1 if cfg.bias else 0
    norm = c * (2 if cfg.norm == "layernorm" and cfg.bias else 1)
    attn = c * c + 2 * c * kv + c * c + bias * (c + 2 * kv + c)
    if cfg.mlp == "swiglu":
        hidden = int(math.ceil(8 * c / 3 / 64) * 64)
        mlp = 3 * c * hidden + bias * (2 * hidden + c)
    else:
        mlp = 2 * 4 * c * c + bias * (4 * c + c)
    pos = cfg.block_size * c if cfg.pos == "learned" else 0
    return cfg.vocab_size * c + pos + cfg.n_layer * (attn + mlp + 2 * norm) + norm


def matmul_params(cfg: GPTConfig) -> int:
    """N of the FLOPs formula: every parameter but the learned position table."""
    pos = cfg.block_size * cfg.n_embd if cfg.pos == "learned" else 0
    return count_params(cfg) - pos


def step_flops(cfg: GPTConfig, batch: int, seq: int | None = None) -> int:
    """Model FLOPs of one training step (forward, backward) at `batch` x `seq` tokens."""
    t = cfg.block_size if seq is None else seq
    hd = cfg.n_embd // cfg.n_head
    return 6 * matmul_params(cfg) * batch * t + 12 * cfg.n_layer * cfg.n_head * hd * t * t * batch
