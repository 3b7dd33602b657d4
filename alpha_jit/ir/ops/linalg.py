"""Matmul and the row gather/scatter pair used by embeddings.

matmul: a[..., M, K] @ b[..., K, N] with numpy batch broadcasting; transposes reach the kernel
as strides. gather_rows: table[V, D] indexed by i32 ids[...] -> [..., D]. scatter_add_rows: the
VJP of gather, summing rows of g[N, D] into a zero [V, D] table at ids[N] (deterministic).
"""

from __future__ import annotations

import numpy as np

from alpha_jit import dtypes
from alpha_jit.errors import DTypeError, ShapeError
from alpha_jit.ir.ops.registry import OpDef, register
from alpha_jit.ir.ops.rules import broadcast_shapes, same_dtype


def _matmul_infer(shapes, dts, attrs):
    a, b = shapes
    if len(a) < 2 or len(b) < 2:
        raise ShapeError("matmul", f"operands need at least 2 dimensions, got shapes {a} and "
                         f"{b} (reshape vectors to (1, n) or (n, 1))")
    if a[-1] != b[-2]:
        raise ShapeError("matmul", f"shapes {a} and {b} are incompatible: inner dimensions "
                         f"{a[-1]} != {b[-2]}")
    dt = same_dtype("matmul", shapes, dts)
    if not dt.is_float:
        raise DTypeError("matmul", f"needs floating-point operands, got {dt}")
    batch = broadcast_shapes("matmul", [a[:-2], b[:-2]])
    # the kernel accumulates in f32; the precision policy may keep that f32 result
    out = dtypes.dtype(attrs["out_dtype"]) if "out_dtype" in attrs else dt
    return (*batch, a[-2], b[-1]), out


def _matmul_vjp(g, args, out, attrs):
    from alpha_jit.tensor import sum_to

    a, b = args
    if b.ndim == 2 and a.ndim > 2:
        # x[..., K] @ W[K, N]: fold the batch into rows so dW is one GEMM, not a batched sum
        k, n = b.shape
        ga = g @ b.swap_last()
        gb = a.reshape(-1, k).swap_last() @ g.reshape(-1, n)
        return [ga, gb]
    ga = sum_to(g @ b.swap_last(), a.shape)
    gb = sum_to(a.swap_last() @ g, b.shape)
    return [ga, gb]


register(OpDef("matmul", "matmul", _matmul_infer, lambda a, attrs: np.matmul(a[0], a[1]),
               _matmul_vjp))


def _check_ids(op: str, shape: tuple, dt) -> None:
    if dt != dtypes.int32:
        raise DTypeError(op, f"indices must be integer (i32), got {dt}{list(shape)}")


def _gather_infer(shapes, dts, attrs):
    table, ids = shapes
    if len(table) != 2:
        raise ShapeError("gather_rows", f"table must be 2-D [rows, dim], got {table}")
    _check_ids("gather_rows", ids, dts[1])
    return (*ids, table[1]), dts[0]


def _gather_vjp(g, args, out, attrs):
    from alpha_jit.ir import trace

    table, ids = args
    flat_ids = ids.reshape(-1)
    gf = g.reshape(-1, table.shape[1])
    return [trace.apply("scatter_add_rows", [gf, flat_ids], {"rows": table.shape[0]}), None]


register(OpDef("gather_rows", "gather", _gather_infer,
               lambda a, attrs: a[0][a[1]], _gather_vjp, nondiff_args=(1,)))


def _scatter_infer(shapes, dts, attrs):
    src, ids = shapes
    if len(src) != 2 or len(ids) != 1 or ids[0] != src[0]:
        raise ShapeError("scatter_add_rows", f"needs src [N, D] and ids [N], got {src} and "
                         f"{ids}")
    _check_ids("scatter_add_rows", ids, dts[1])
    return (attrs["rows"], src[1]), dts[0]


def _scatter_ref(a, attrs):
    out = np.zeros((attrs["rows"], a[0].shape[1]), dtype=a[0].dtype)
    np.add.at(out, a[1], a[0])
    return out


def _scatter_vjp(g, args, out, attrs):
    from alpha_jit.ir import trace

    return [trace.apply("gather_rows", [g, args[1]]), None]


register(OpDef("scatter_add_rows", "scatter", _scatter_infer, _scatter_ref, _scatter_vjp,
               nondiff_args=(1,)))
