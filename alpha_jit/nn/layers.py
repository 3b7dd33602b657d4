"""Layers with PyTorch's constructor signatures, defaults, initialisations and reprs.

Linear, Embedding, LayerNorm, RMSNorm, Dropout, the activations, Softmax, Flatten and
Identity: a model written against `torch.nn` builds the same tree here, so its `state_dict`
loads and its printout reads the same. Options alpha_jit cannot honour raise
`UnsupportedOptionError` naming the option instead of being ignored.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from alpha_jit.errors import AlphaJitError
from alpha_jit.ir import trace
from alpha_jit.nn import functional as F
from alpha_jit.nn.module import Module, Parameter
from alpha_jit.nn.state_dict import host_array
from alpha_jit.tensor import Tensor, as_tensor, full

_rng = np.random.default_rng(0)


class UnsupportedOptionError(AlphaJitError, NotImplementedError):
    """A PyTorch constructor option this layer does not implement; the message says which."""


def manual_seed(seed: int) -> None:
    """Seed parameter initialisation (a process-wide numpy Generator)."""
    global _rng
    _rng = np.random.default_rng(seed)


def rng() -> np.random.Generator:
    return _rng


def _check_factory(layer: str, device: Any, dtype: Any) -> None:
    """`device` means nothing here (every state lives on the Vulkan device); only float32
    parameters exist (bf16/f16 are a `compile(precision=...)` policy, not a storage type)."""
    if dtype is None:
        return
    try:
        ok = np.dtype(dtype) == np.float32
    except TypeError:  # not a numpy dtype: torch.float32 and names
        ok = str(dtype).replace("torch.", "") in ("float32", "float", "f32")
    if not ok:
        raise UnsupportedOptionError(f"{layer}(dtype={dtype}): parameters are float32; use "
                                     "aj.compile(precision='bf16') for low-precision math")


class Linear(Module):
    """y = x W^T + b, W [out_features, in_features], PyTorch's uniform(+-1/sqrt(in)) init."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Any = None, dtype: Any = None):
        super().__init__()
        _check_factory("Linear", device, dtype)
        self.in_features, self.out_features = in_features, out_features
        bound = 1.0 / math.sqrt(in_features)  # PyTorch's kaiming-uniform(a=sqrt(5)) bound
        self.weight = Parameter(_rng.uniform(-bound, bound, (out_features, in_features)))
        if bias:
            self.bias = Parameter(_rng.uniform(-bound, bound, (out_features,)))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Any) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Embedding(Module):
    """A lookup table [num_embeddings, embedding_dim], PyTorch's normal(0, 1) init."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, sparse: bool = False, _weight: Any = None,
                 _freeze: bool = False, device: Any = None, dtype: Any = None):
        super().__init__()
        _check_factory("Embedding", device, dtype)
        for option, value, default in (("max_norm", max_norm, None),
                                       ("scale_grad_by_freq", scale_grad_by_freq, False),
                                       ("sparse", sparse, False)):
            if value != default:
                raise UnsupportedOptionError(f"Embedding({option}={value!r}) is not supported "
                                             f"(only {option}={default!r})")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = padding_idx, max_norm, norm_type
        self.scale_grad_by_freq, self.sparse = scale_grad_by_freq, sparse
        if _weight is None:
            data = _rng.normal(0.0, 1.0, (num_embeddings, embedding_dim))
        else:
            data = _weight
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"Embedding: padding_idx {padding_idx} must be within "
                                 f"num_embeddings {num_embeddings}")
            padding_idx %= num_embeddings
            if _weight is None:  # PyTorch zeroes the padding row of a fresh table
                data[padding_idx] = 0.0
        self.padding_idx = padding_idx
        self.weight = Parameter(data, requires_grad=not _freeze)
        if self.weight.shape != (num_embeddings, embedding_dim):
            raise ValueError(f"Embedding: _weight has shape {self.weight.shape}, expected "
                             f"{(num_embeddings, embedding_dim)}")

    @classmethod
    def from_pretrained(cls, embeddings: Any, freeze: bool = True, **kw: Any) -> Embedding:
        """An Embedding holding `embeddings` [num, dim]; frozen unless freeze=False."""
        arr = host_array(embeddings)
        if arr.ndim != 2:
            raise ValueError(f"Embeddings parameter is expected to be 2-dimensional, got "
                             f"shape {arr.shape}")
        return cls(arr.shape[0], arr.shape[1], _weight=arr, _freeze=freeze, **kw)

    def forward(self, ids: Any) -> Tensor:
        return F.embedding(ids, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}"


def _normalized_shape(layer: str, shape: Any) -> tuple[int]:
    """(n,) from an int or a 1-tuple; the fused norm kernels normalise the last axis only."""
    dims = (int(shape),) if isinstance(shape, int | np.integer) else tuple(int(s) for s in shape)
    if len(dims) != 1:
        n = int(np.prod(dims))
        raise UnsupportedOptionError(
            f"{layer}(normalized_shape={dims}): only the last axis can be normalised; reshape "
            f"the input so the {len(dims)} trailing axes form one (x.reshape(*x.shape[:-"
            f"{len(dims)}], {n})) and use {layer}({n})")
    return (dims[0],)


class LayerNorm(Module):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis: one fused kernel
    each way (ir/ops/rowwise.py), f32 math."""

    def __init__(self, normalized_shape: int | tuple[int], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device: Any = None,
                 dtype: Any = None):
        super().__init__()
        _check_factory("LayerNorm", device, dtype)
        self.normalized_shape = _normalized_shape("LayerNorm", normalized_shape)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        n = self.normalized_shape[0]
        if elementwise_affine:
            self.weight = Parameter(np.ones(n, np.float32))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = Parameter(np.zeros(n, np.float32))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Any) -> Tensor:
        # the fused op always scales: a constant 1 when there is no learned weight
        w = self.weight if self.weight is not None else full(self.normalized_shape, 1.0)
        args = [x, w] + ([self.bias] if self.bias is not None else [])
        return trace.apply("layer_norm", args, {"eps": float(self.eps)})

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine="
                f"{self.elementwise_affine}, bias={self.bias is not None}")


class RMSNorm(Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis; `eps=None` is float32's
    machine epsilon, as in PyTorch."""

    def __init__(self, normalized_shape: int | tuple[int], eps: float | None = None,
                 elementwise_affine: bool = True, device: Any = None, dtype: Any = None):
        super().__init__()
        _check_factory("RMSNorm", device, dtype)
        self.normalized_shape = _normalized_shape("RMSNorm", normalized_shape)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        if elementwise_affine:
            self.weight = Parameter(np.ones(self.normalized_shape[0], np.float32))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: Any) -> Tensor:
        eps = float(np.finfo(np.float32).eps) if self.eps is None else float(self.eps)
        w = self.weight if self.weight is not None else full(self.normalized_shape, 1.0)
        return trace.apply("rms_norm", [x, w], {"eps": eps})

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


class Dropout(Module):
    """Zeroes elements with probability p while training (scaling the rest by 1/(1-p));
    identity after `eval()`. The flag is a guard of the compiled step."""

    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p, self.inplace = p, inplace

    def forward(self, x: Any) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


class _Activation(Module):
    """An elementwise activation with PyTorch's `inplace` flag (accepted; a traced step has
    no in-place ops, so it changes nothing but the repr)."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class ReLU(_Activation):
    def forward(self, x: Any) -> Tensor:
        return F.relu(x)


class SiLU(_Activation):
    def forward(self, x: Any) -> Tensor:
        return F.silu(x)


class GELU(Module):
    """GELU; `approximate='none'` is the exact (erf) form, 'tanh' GPT-2's."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Any) -> Tensor:
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class Tanh(Module):
    def forward(self, x: Any) -> Tensor:
        return as_tensor(x).tanh()


class Sigmoid(Module):
    def forward(self, x: Any) -> Tensor:
        return F.sigmoid(x)


class Identity(Module):
    """Returns its input; takes (and ignores) any arguments, as PyTorch's."""

    def __init__(self, *args: Any, **kw: Any):
        super().__init__()

    def forward(self, x: Any) -> Any:
        return x


class Softmax(Module):
    """softmax along `dim`; dim=None picks PyTorch's legacy implicit axis (with its warning)."""

    def __init__(self, dim: int | None = None):
        super().__init__()
        self.dim = dim

    def forward(self, x: Any) -> Tensor:
        x = as_tensor(x)
        dim = self.dim
        if dim is None:
            warnings.warn("Implicit dimension choice for softmax has been deprecated. Change "
                          "the call to include dim=X as an argument.", stacklevel=2)
            dim = 0 if x.ndim in (0, 1, 3) else 1
        return F.softmax(x, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Flatten(Module):
    """Merges dimensions start_dim..end_dim into one (the batch axis stays by default)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x: Any) -> Tensor:
        return as_tensor(x).flatten(self.start_dim, self.end_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"
