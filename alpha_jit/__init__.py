"""alpha_jit: a JIT compiler that trains transformers on any GPU with a Vulkan driver.

Decorate a whole training step with `@alpha_jit.compile`; it is traced into a graph,
differentiated, fused, emitted as SPIR-V and replayed on Vulkan every call.
"""

from alpha_jit.compile import CompiledFunction, compile  # noqa: A004
from alpha_jit.dtypes import bfloat16, float16, float32, int32
from alpha_jit.errors import AlphaJitError, DTypeError, ShapeError, TraceError
from alpha_jit.tensor import StateTensor, Tensor, full, iota, maximum, minimum, where

__version__ = "0.1.0"
__all__ = ["compile", "CompiledFunction", "Tensor", "StateTensor", "float32", "float16",
           "bfloat16", "int32", "AlphaJitError", "TraceError", "ShapeError", "DTypeError",
           "full", "iota", "where", "maximum", "minimum"]
