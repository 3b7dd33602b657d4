"""GEMM K sums: a Linear's bias gradient is computed by its weight-gradient GEMM.

Why: the backward of `x @ W.T + b` reads dY twice, once in the weight-gradient GEMM
(dW = dY^T x, where dY is read along the K axis) and once in the bias gradient (db = sum of
dY's rows), a reduction kernel of its own per Linear: 6 of the 26 backward kernels of a GPT
layer. The GEMM already loads every element of dY; summing it over K as it is loaded (before
any bf16 rounding of the operand) costs one add per load, and one workgroup per tile
column (row) stores the sums: the matmul family's ("colsum_b", True) where dY is the b
operand (x^T @ dY), ("rowsum_a", True) where it is a (dY^T @ x, the layout
ir/passes/gemm_transpose.py gives weight gradients).

Pairs are found structurally (a sum over the rows of the node either GEMM operand reads,
through views and exact casts) and checked exactly when emitted (same buffer, offset,
strides, lengths, dtype). The two may come in either order: whichever is lowered first emits
the GEMM with the column sums, provided the GEMM's operands exist by then and no epilogue
owns it. `ALPHA_JIT_DISABLE_PASSES=gemm_colsum` turns it off.

Where the sum gets the column-strip layout (`kernels/column_strips.py`: any GPU), the pair is
not fused: on the H200 the K sums cost a cooperative-matrix weight-gradient GEMM 25-37%
(`gpt2`: matmuls 31.6 ms with them, 29.0 without) while the 48 strip sums take 1.0 ms, so the
step ran 43.6 ms against 45.4. CPU devices (lavapipe) keep the fused sums.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alpha_jit.codegen_spirv.lower import _Lowerer

log = logging.getLogger("alpha_jit.schedule")
PASS_NAME = "gemm_colsum"


def enabled() -> bool:
    from alpha_jit.ir.passes.manager import disabled_passes

    return PASS_NAME not in disabled_passes()


def _source(lw: _Lowerer, u: int) -> int:
    """The node under u's views and absorbed (exact or on-load) casts."""
    g = lw.g
    while lw._cls(u) == "view" or u in lw.absorbed:
        u = g.args(u)[0]
    return u


def _computed(lw: _Lowerer, u: int) -> bool:
    """Whether u's value exists at this point of the emitted kernel list (a leaf, a constant,
    or written by a kernel already emitted); checked on the graph, before any view of an
    operand is made (making one may emit a copy)."""
    g = lw.g
    return lw._cls(u) in ("input", "constant") or g.op(u) in ("full", "iota") \
        or u in lw.written


def pairs(lw: _Lowerer, order: list[int], taken: set[int]) -> dict[int, int]:
    """reduction -> GEMM and GEMM -> reduction for the candidate pairs (GEMMs in an epilogue,
    `taken`, and batched GEMMs are left alone)."""
    g = lw.g
    by_source: dict[int, list[int]] = {}
    for n in order:
        if lw._cls(n) == "matmul" and n not in taken and len(g.shape(n)) == 2:
            for a in dict.fromkeys(_source(lw, x) for x in g.args(n)[:2]):
                by_source.setdefault(a, []).append(n)
    out: dict[int, int] = {}
    for r in order:
        if g.op(r) != "sum" or g.dtype(r).name != "f32" or r in out:
            continue
        x, ax = g.args(r)[0], g.attrs(r).get("axis")
        red = g.shape(x)[ax] if isinstance(ax, int) and len(g.shape(x)) == 2 else None
        for m in by_source.get(_source(lw, x), []):
            # the sum runs over the GEMM's K (a dX GEMM reads the same dY along its columns)
            if m not in out and g.shape(g.args(m)[0])[-1] == red \
                    and g.shape(r)[-1:] in (g.shape(m)[-1:], g.shape(m)[-2:-1]):
                out[r], out[m] = m, r
                break
    return out


def _strips(lw: _Lowerer, rp: tuple) -> bool:
    """Whether the reduction with these params runs as column strips (a GPU: see the module),
    and so stays out of its GEMM."""
    from alpha_jit.codegen_spirv.kernels import reduction

    return reduction.strip_chunks(rp, lw.caps) is not None


def _side(lw: _Lowerer, rp: dict, mp: dict, r_base: int, m_reads: list[int]) -> str | None:
    """The GEMM operand ("b", then "a") whose sums over K the reduction is exactly, if any;
    None also where the reduction runs as column strips."""
    if _strips(lw, tuple(rp.items())):
        return None
    if mp["batch"] != 1 or rp["mode"] != "sum" or rp["out_dtype"] != "f32" \
            or rp["red_len"] != mp["k"]:
        return None
    for side, i, outer in (("b", 1, "n"), ("a", 0, "m")):
        dt, off, _sb, s_first, s_second = mp[side]
        sk, s_outer = (s_first, s_second) if side == "b" else (s_second, s_first)
        if (r_base == m_reads[i] and rp["in_dtype"] == dt and rp["offset"] == off
                and rp["red_stride"] == sk and rp["outer_shape"] == (mp[outer],)
                and rp["outer_strides"] == (s_outer,)):
            return side
    return None


_PARAM = {"b": "colsum_b", "a": "rowsum_a"}


def _emit(lw: _Lowerer, m: int, params: tuple, reads: list[int], r: int | None,
          side: str | None = None) -> None:
    p = dict(params)
    name = f"matmul_{p['batch']}x{p['m']}x{p['n']}x{p['k']}"
    if r is None or side is None:
        lw._emit("matmul", name, params, reads, [m], [m], m)
        return
    lw.done.update((m, r))
    lw._emit("matmul", f"{name}_{'colsum' if side == 'b' else 'rowsum'}",
             params + ((_PARAM[side], True),), reads, [m, r], [m, r], m, fused_by=(PASS_NAME,))


def emit_matmul(lw: _Lowerer, m: int, params: tuple, reads: list[int]) -> None:
    """Emit GEMM m, with its pair's K sums when the pair is not lowered yet and fits."""
    r = lw.colsums.get(m)
    side = None
    if r is not None and r not in lw.done:
        rp, r_reads = lw.reduction_params(r)
        side = _side(lw, dict(rp), dict(params), r_reads[0], reads)
    _emit(lw, m, params, reads, r, side)


def emit_early(lw: _Lowerer, r: int) -> bool:
    """Reduction r comes first: emit its GEMM here (with the column sums) if the GEMM's
    operands are computed already. False: the caller emits the reduction alone."""
    m = lw.colsums.get(r)
    if m is None or m in lw.done:
        return False
    rp, r_reads = lw.reduction_params(r)
    if _strips(lw, rp) or not all(_computed(lw, _source(lw, a)) for a in lw.g.args(m)):
        # a GPU's strip sum, or the GEMM's operands come later: each is emitted on its own
        # (before the GEMM's params: they may copy an operand)
        lw.colsums.pop(m, None)
        lw.colsums.pop(r, None)
        return False
    params, reads = lw.matmul_params(m)  # safe now: any copy it makes reads computed values
    side = _side(lw, dict(rp), dict(params), r_reads[0], reads)
    if side is None:
        lw.colsums.pop(m, None)  # not this pair: each is emitted on its own
        return False
    _emit(lw, m, params, reads, r, side)
    return True
