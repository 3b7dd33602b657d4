"""Layers: Linear, Embedding, ReLU, GELU, with PyTorch's default initialisations."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from alpha_jit.nn import functional as F
from alpha_jit.nn.module import Module, Parameter
from alpha_jit.tensor import Tensor

_rng = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed parameter initialisation (a process-wide numpy Generator)."""
    global _rng
    _rng = np.random.default_rng(seed)


def rng() -> np.random.Generator:
    return _rng


class Linear(Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # PyTorch's kaiming-uniform(a=sqrt(5)) bound
        self.weight = Parameter(_rng.uniform(-bound, bound, (out_features, in_features)))
        self.bias = Parameter(_rng.uniform(-bound, bound, (out_features,))) if bias else None

    def forward(self, x: Any) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = Parameter(_rng.normal(0.0, 1.0, (num_embeddings, dim)))

    def forward(self, ids: Any) -> Tensor:
        return F.embedding(ids, self.weight)


class ReLU(Module):
    def forward(self, x: Any) -> Tensor:
        return F.relu(x)


class GELU(Module):
    def forward(self, x: Any) -> Tensor:
        return F.gelu(x)
