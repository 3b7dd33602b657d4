"""alpha_jit: a JIT compiler that trains transformers on any GPU with a Vulkan driver.

Decorate a whole training step with `@alpha_jit.compile`; it is traced into a graph,
differentiated, fused, emitted as SPIR-V and replayed on Vulkan every call. The names below
follow PyTorch's (`alpha_jit.cat`, `alpha_jit.zeros`, ...): see docs/api.md.
"""

from alpha_jit.compile import CompiledFunction, compile  # noqa: A004
from alpha_jit.creation import (
    arange,
    constant,
    empty,
    empty_like,
    eye,
    full,
    full_like,
    linspace,
    ones,
    ones_like,
    rand,
    rand_like,
    randint,
    randn,
    randn_like,
    tensor,
    tril,
    triu,
    zeros,
    zeros_like,
)
from alpha_jit.dtypes import bfloat16, float16, float32, int32
from alpha_jit.errors import AlphaJitError, DTypeError, ShapeError, TraceError
from alpha_jit.functions import (  # noqa: A004
    abs,  # noqa: A004
    amax,
    amin,
    argmax,
    argmin,
    bmm,
    chunk,
    clamp,
    cos,
    erf,
    exp,
    flatten,
    floor,
    floor_divide,
    log,
    log_softmax,
    logsumexp,
    masked_fill,
    matmul,
    max,
    mean,
    min,
    mm,
    narrow,
    numel,
    permute,
    pow,  # noqa: A004
    remainder,
    reshape,
    rsqrt,
    sigmoid,
    sin,
    softmax,
    split,
    sqrt,
    square,
    squeeze,
    std,
    sum,
    tanh,
    transpose,
    unbind,
    unsqueeze,
    var,
)
from alpha_jit.tensor import StateTensor, Tensor, iota, maximum, minimum, where
from alpha_jit.tensor_shape import cat, stack
from alpha_jit.tensor_shape import cat as concat

float = float32  # noqa: A001 - PyTorch's aliases (torch.float, torch.half, torch.long)
half = float16
long = int32  # alpha_jit's integers are 32-bit
int = int32  # noqa: A001

__version__ = "0.1.0"
__all__ = ["compile", "CompiledFunction", "Tensor", "StateTensor", "float32", "float16",
           "bfloat16", "int32", "float", "half", "long", "int", "AlphaJitError",
           "TraceError", "ShapeError", "DTypeError", "full", "iota", "where", "maximum",
           "minimum", "zeros", "ones", "empty", "zeros_like", "ones_like", "empty_like",
           "full_like", "arange", "linspace", "eye", "tril", "triu", "rand", "randn",
           "rand_like", "randn_like", "randint", "tensor", "constant", "cat", "concat", "stack",
           "abs", "argmax", "argmin", "clamp", "cos", "erf", "exp", "flatten", "floor", "log",
           "logsumexp", "masked_fill", "matmul", "mean", "permute", "reshape", "rsqrt",
           "sigmoid", "sin", "sqrt", "squeeze", "std", "sum", "tanh", "transpose", "unsqueeze",
           "var", "amax", "amin", "max", "min", "bmm", "chunk", "floor_divide", "log_softmax",
           "mm", "narrow", "numel", "pow", "remainder", "softmax", "split", "square",
           "unbind"]
