"""Layout ops: reshape, transpose, broadcast_to. They are views: no kernel of their own.

Lowering folds them into the strides with which the consuming kernel reads its input, so a
transposed weight feeds a matmul and a broadcast bias feeds an elementwise kernel with no copy.
"""

from __future__ import annotations

import numpy as np

from alpha_jit.errors import ShapeError
from alpha_jit.ir.ops.registry import OpDef, register
from alpha_jit.tensor import sum_to


def _reshape_infer(shapes, dts, attrs):
    src = shapes[0]
    want = list(attrs["shape"])
    n = int(np.prod(src, dtype=np.int64))
    if want.count(-1) > 1:
        raise ShapeError("reshape", f"only one -1 allowed in {tuple(want)}")
    if -1 in want:
        known = int(np.prod([w for w in want if w != -1], dtype=np.int64))
        if known == 0 or n % known:
            raise ShapeError("reshape", f"cannot reshape {src} into {tuple(want)}")
        want[want.index(-1)] = n // known
    if int(np.prod(want, dtype=np.int64)) != n:
        raise ShapeError("reshape", f"cannot reshape {src} ({n} elements) into {tuple(want)}")
    attrs["shape"] = tuple(want)  # resolved -1, so every later stage sees the real shape
    return tuple(want), dts[0]


register(OpDef("reshape", "view", _reshape_infer,
               lambda a, attrs: a[0].reshape(attrs["shape"]),
               lambda g, args, out, attrs: [g.reshape(args[0].shape)]))


def _transpose_infer(shapes, dts, attrs):
    perm = tuple(int(p) % max(len(shapes[0]), 1) for p in attrs["perm"])
    if sorted(perm) != list(range(len(shapes[0]))):
        raise ShapeError("transpose", f"{attrs['perm']} is not a permutation of the axes of "
                         f"{shapes[0]}")
    attrs["perm"] = perm
    return tuple(shapes[0][p] for p in perm), dts[0]


register(OpDef("transpose", "view", _transpose_infer,
               lambda a, attrs: np.transpose(a[0], attrs["perm"]),
               lambda g, args, out, attrs: [g.permute(*np.argsort(attrs["perm"]))]))


def _broadcast_infer(shapes, dts, attrs):
    src, dst = shapes[0], tuple(attrs["shape"])
    ok = len(dst) >= len(src) and all(
        s in (1, d) for s, d in zip(src[::-1], dst[::-1], strict=False))
    if not ok:
        raise ShapeError("broadcast_to", f"cannot broadcast {src} to {dst}")
    return dst, dts[0]


register(OpDef("broadcast_to", "view", _broadcast_infer,
               lambda a, attrs: np.broadcast_to(a[0], attrs["shape"]),
               lambda g, args, out, attrs: [sum_to(g, args[0].shape)]))


# ---- slice (a view) and pad (its VJP, read through a window) -----------------------------------
def _slice_infer(shapes, dts, attrs):
    shape = shapes[0]
    starts, stops = attrs["starts"], attrs["stops"]
    if len(starts) != len(shape) or len(stops) != len(shape) or any(
            not 0 <= a <= b <= s for a, b, s in zip(starts, stops, shape, strict=True)):
        raise ShapeError("slice", f"bounds {tuple(zip(starts, stops, strict=False))} do not fit "
                         f"shape {shape}")
    return tuple(b - a for a, b in zip(starts, stops, strict=True)), dts[0]


def _slice_vjp(g, args, out, attrs):
    from alpha_jit.ir import trace

    pads = tuple((a, s - b) for a, b, s in zip(attrs["starts"], attrs["stops"], args[0].shape,
                                               strict=True))
    return [trace.apply("pad", [g], {"pads": pads})]


register(OpDef("slice", "view", _slice_infer,
               lambda a, attrs: a[0][tuple(slice(s, e) for s, e in zip(
                   attrs["starts"], attrs["stops"], strict=True))],
               _slice_vjp))


def _pad_infer(shapes, dts, attrs):
    pads = attrs["pads"]
    if len(pads) != len(shapes[0]) or any(b < 0 or e < 0 for b, e in pads):
        raise ShapeError("pad", f"pads {pads} do not fit shape {shapes[0]}")
    return tuple(s + b + e for s, (b, e) in zip(shapes[0], pads, strict=True)), dts[0]


def _pad_vjp(g, args, out, attrs):
    from alpha_jit.ir import trace

    starts = tuple(b for b, _ in attrs["pads"])
    stops = tuple(b + s for (b, _), s in zip(attrs["pads"], args[0].shape, strict=True))
    return [trace.apply("slice", [g], {"starts": starts, "stops": stops})]


# pad is elementwise: its consumer kernel reads the input through a window (zeros outside)
register(OpDef("pad", "elementwise", _pad_infer,
               lambda a, attrs: np.pad(a[0], attrs["pads"]), _pad_vjp,
               lambda e, attrs, x: x))
