"""Single-axis reductions: sum, mean, max, logsumexp (with or without keepdims).

Multi-axis reductions are chains of these (see `TensorOps._reduce`). Lowering turns each into a
row-reduction kernel reading the input through its strides, accumulating in f32.
"""

from __future__ import annotations

import numpy as np

from alpha_jit.errors import ShapeError
from alpha_jit.ir.ops.registry import OpDef, register
from alpha_jit.ir.ops.rules import require_float


def _infer(name: str):
    def infer(shapes, dts, attrs):
        shape = shapes[0]
        axis = attrs["axis"]
        if not 0 <= axis < len(shape):
            raise ShapeError(name, f"axis {axis} is out of range for shape {shape}")
        if shape[axis] == 0:
            raise ShapeError(name, f"cannot reduce an empty axis of shape {shape}")
        if name != "sum" or dts[0].is_float:
            require_float(name, shapes, dts)
        out = list(shape)
        if attrs["keepdims"]:
            out[axis] = 1
        else:
            del out[axis]
        return tuple(out), dts[0]

    return infer


def _expand(g, attrs, in_shape):
    """Cotangent of the reduced value, broadcast back over the reduced axis."""
    if not attrs["keepdims"]:
        kept = list(in_shape)
        kept[attrs["axis"]] = 1
        g = g.reshape(tuple(kept))
    return g.broadcast_to(in_shape)


def _lse_ref(a, attrs):
    x, axis = a[0], attrs["axis"]
    m = np.max(x, axis=axis, keepdims=True)
    # an infinite max shifts by 0 (as the kernel does): all -inf rows give -inf, a +inf gives
    # +inf, where x - m would make NaN of both
    m = np.where(np.isinf(m), np.zeros_like(m), m)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if attrs["keepdims"] else np.squeeze(out, axis=axis)


def _keep(out, attrs):
    """The reduced value with the axis kept, for broadcasting against the input."""
    if attrs["keepdims"]:
        return out
    kept = list(out.shape)
    kept.insert(attrs["axis"], 1)
    return out.reshape(tuple(kept))


register(OpDef("sum", "reduction", _infer("sum"),
               lambda a, attrs: np.sum(a[0], axis=attrs["axis"], keepdims=attrs["keepdims"]),
               lambda g, args, out, attrs: [_expand(g, attrs, args[0].shape)]))
register(OpDef("mean", "reduction", _infer("mean"),
               lambda a, attrs: np.mean(a[0], axis=attrs["axis"], keepdims=attrs["keepdims"]),
               lambda g, args, out, attrs: [
                   _expand(g, attrs, args[0].shape) * (1.0 / args[0].shape[attrs["axis"]])]))
def _max_vjp(g, args, out, attrs):
    """Ties share the gradient evenly, as PyTorch's amax and max() do."""
    hit = args[0].eq(_keep(out, attrs))
    ties = hit.sum(axis=attrs["axis"], keepdims=True)
    return [_expand(g, attrs, args[0].shape) * hit / ties]


register(OpDef("max", "reduction", _infer("max"),
               lambda a, attrs: np.max(a[0], axis=attrs["axis"], keepdims=attrs["keepdims"]),
               _max_vjp))
register(OpDef("logsumexp", "reduction", _infer("logsumexp"), _lse_ref,
               lambda g, args, out, attrs: [
                   _expand(g, attrs, args[0].shape) * (args[0] - _keep(out, attrs)).exp()]))
