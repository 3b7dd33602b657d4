"""Multi-tensor ops: one node over many tensors of different shapes.

`sum_squares(t1, ..., tn)` is the squared L2 norm of all of them together (gradient clipping,
norms of whole models). As a chain of per-tensor reductions it costs two or three kernels per
parameter (about 200 on the `small` GPT); as one op it lowers to one partial-sums kernel over
every tensor plus one final sum (`codegen_spirv/kernels/multi_reduce.py`).
"""

from __future__ import annotations

import numpy as np

from alpha_jit import dtypes
from alpha_jit.errors import DTypeError, ShapeError
from alpha_jit.ir.ops.registry import OpDef, register


def _infer(shapes, dts, attrs):
    if not shapes:
        raise ShapeError("sum_squares", "needs at least one tensor")
    bad = [f"{d}{list(s)}" for s, d in zip(shapes, dts, strict=True) if not d.is_float]
    if bad:
        raise DTypeError("sum_squares", f"takes floating-point tensors, got {', '.join(bad)}")
    return (), dtypes.float32


def _ref(a, attrs):
    total = sum(np.sum(np.square(x.astype(np.float64))) for x in a)
    # the inputs' float type: float64 when a gradient check differentiates it numerically
    return np.asarray(total, np.result_type(*a, np.float32))


def _vjp(g, args, out, attrs):
    return [a * (g * 2.0) for a in args]


register(OpDef("sum_squares", "kernel", _infer, _ref, _vjp))
