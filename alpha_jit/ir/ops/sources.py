"""Leaf ops: values that enter a step rather than being computed from other nodes.

`input` (a user argument), `state` (a parameter or optimizer buffer living on the device),
`hparam` (a host scalar such as the learning rate, fed every call), and the generators `full`
(a constant) and `iota` (the index along an axis), which kernels compute in place.
"""

from __future__ import annotations

import numpy as np

from alpha_jit import dtypes
from alpha_jit.ir.ops.registry import OpDef, register


def _leaf_infer(shapes, dts, attrs):
    raise AssertionError("leaf ops are created with trace.leaf / TraceContext, not apply")


def _no_ref(a, attrs):
    raise AssertionError("the interpreter feeds leaf values directly")


for _name in ("input", "state", "hparam"):
    register(OpDef(_name, "input", _leaf_infer, _no_ref))


def _full_ref(a, attrs):
    return np.array(attrs["value"])  # broadcast by the interpreter to the node's shape


register(OpDef("full", "constant", _leaf_infer, _full_ref,
               scalar=lambda e, attrs: e.const(attrs["value"],
                                               "f32" if isinstance(attrs["value"], float)
                                               else "i32")))


def _iota_ref(a, attrs):
    shape, axis = attrs["shape"], attrs["axis"]
    if axis == -1:  # the row-major linear index
        return np.arange(int(np.prod(shape, dtype=np.int64)), dtype=np.int32).reshape(shape)
    idx = np.arange(shape[axis], dtype=np.int32)
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.broadcast_to(idx.reshape(view), shape).copy()


register(OpDef("iota", "elementwise", _leaf_infer, _iota_ref))

I32 = dtypes.int32
