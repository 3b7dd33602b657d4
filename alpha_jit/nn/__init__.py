"""alpha_jit.nn: modules, functional ops and optimizers for compiled training steps."""

from alpha_jit.nn import functional, optim
from alpha_jit.nn.layers import GELU, Embedding, Linear, ReLU, manual_seed
from alpha_jit.nn.module import Module, Parameter, Sequential
from alpha_jit.nn.optim import clip_grad_norm_
from alpha_jit.nn.transformer import (
    CONFIGS,
    GPT,
    MLP,
    Block,
    CausalSelfAttention,
    GPTConfig,
    LayerNorm,
    RMSNorm,
)

__all__ = ["functional", "optim", "Module", "Parameter", "Sequential", "Linear", "Embedding",
           "ReLU", "GELU", "manual_seed",
           "GPT", "GPTConfig", "CONFIGS", "LayerNorm", "RMSNorm", "MLP", "Block",
           "CausalSelfAttention", "clip_grad_norm_"]
