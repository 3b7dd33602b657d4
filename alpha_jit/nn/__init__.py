"""alpha_jit.nn: modules, functional ops and optimizers for compiled training steps."""

from alpha_jit.nn import functional, optim, utils
from alpha_jit.nn.containers import ModuleDict, ModuleList, Sequential
from alpha_jit.nn.layers import (
    GELU,
    Dropout,
    Embedding,
    Flatten,
    Identity,
    LayerNorm,
    Linear,
    ReLU,
    RMSNorm,
    Sigmoid,
    SiLU,
    Softmax,
    Tanh,
    UnsupportedOptionError,
    manual_seed,
)
from alpha_jit.nn.module import Module, Parameter
from alpha_jit.nn.optim import clip_grad_norm_
from alpha_jit.nn.state_dict import IncompatibleKeys, StateDictError
from alpha_jit.nn.transformer import CONFIGS, GPT, MLP, Block, CausalSelfAttention, GPTConfig

__all__ = ["functional", "optim", "utils", "Module", "Parameter", "Sequential", "ModuleList",
           "ModuleDict", "Linear", "Embedding", "LayerNorm", "RMSNorm", "Dropout", "ReLU",
           "GELU", "SiLU", "Tanh", "Sigmoid", "Identity", "Softmax", "Flatten", "manual_seed",
           "StateDictError", "IncompatibleKeys", "UnsupportedOptionError",
           "GPT", "GPTConfig", "CONFIGS", "MLP", "Block", "CausalSelfAttention",
           "clip_grad_norm_"]
