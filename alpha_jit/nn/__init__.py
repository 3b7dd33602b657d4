"""alpha_jit.nn: modules, functional ops and optimizers for compiled training steps."""

from alpha_jit.nn import functional, optim
from alpha_jit.nn.layers import GELU, Embedding, Linear, ReLU, manual_seed
from alpha_jit.nn.module import Module, Parameter, Sequential

__all__ = ["functional", "optim", "Module", "Parameter", "Sequential", "Linear", "Embedding",
           "ReLU", "GELU", "manual_seed"]
