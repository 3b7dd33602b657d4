"""GEMM column sums: a Linear's bias gradient is computed by its weight-gradient GEMM.

Why: the backward of `x @ W.T + b` reads dY twice, once in the weight-gradient GEMM
(dW = dY^T x, where dY is the operand whose rows are the K axis) and once in the bias
gradient (db = sum of dY's rows), a reduction kernel of its own per Linear: 6 of the 26
backward kernels of a GPT layer. The GEMM already loads every element of dY; summing the
columns as they are loaded (before any bf16 rounding of the operand) costs one add per load,
and the first row of workgroups stores the sums (the matmul family's ("colsum_b", True)).

Pairs are found structurally (a sum over the rows of the node the GEMM's b operand reads,
through views and exact casts) and checked exactly when emitted (same buffer, offset,
strides, lengths, dtype). The two may come in either order: whichever is lowered first emits
the GEMM with the column sums, provided the GEMM's operands exist by then and no epilogue
owns it. `ALPHA_JIT_DISABLE_PASSES=gemm_colsum` turns it off.
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
            by_source.setdefault(_source(lw, g.args(n)[1]), []).append(n)
    out: dict[int, int] = {}
    for r in order:
        if g.op(r) != "sum" or g.dtype(r).name != "f32" or r in out:
            continue
        for m in by_source.get(_source(lw, g.args(r)[0]), []):
            if m not in out:
                out[r], out[m] = m, r
                break
    return out


def _matches(rp: dict, mp: dict, r_base: int, m_reads: list[int]) -> bool:
    """The reduction sums exactly the columns of the GEMM's b operand over K."""
    _dt, off, sb, sk, sn = mp["b"]
    return (mp["batch"] == 1 and r_base == m_reads[1] and rp["mode"] == "sum"
            and rp["out_dtype"] == "f32" and rp["in_dtype"] == mp["b"][0]
            and rp["offset"] == off and rp["red_len"] == mp["k"] and rp["red_stride"] == sk
            and rp["outer_shape"] == (mp["n"],) and rp["outer_strides"] == (sn,))


def _emit(lw: _Lowerer, m: int, params: tuple, reads: list[int], r: int | None) -> None:
    p = dict(params)
    name = f"matmul_{p['batch']}x{p['m']}x{p['n']}x{p['k']}"
    if r is None:
        lw._emit("matmul", name, params, reads, [m], [m], m)
        return
    lw.done.update((m, r))
    lw._emit("matmul", f"{name}_colsum", params + (("colsum_b", True),), reads, [m, r],
             [m, r], m, fused_by=(PASS_NAME,))


def emit_matmul(lw: _Lowerer, m: int, params: tuple, reads: list[int]) -> None:
    """Emit GEMM m, with its pair's column sums when the pair is not lowered yet and fits."""
    r = lw.colsums.get(m)
    if r is not None and r not in lw.done:
        rp, r_reads = lw.reduction_params(r)
        if not _matches(dict(rp), dict(params), r_reads[0], reads):
            r = None
    else:
        r = None
    _emit(lw, m, params, reads, r)


def emit_early(lw: _Lowerer, r: int) -> bool:
    """Reduction r comes first: emit its GEMM here (with the column sums) if the GEMM's
    operands are computed already. False: the caller emits the reduction alone."""
    m = lw.colsums.get(r)
    if m is None or m in lw.done:
        return False
    if not all(_computed(lw, _source(lw, a)) for a in lw.g.args(m)):
        lw.colsums.pop(m, None)  # its operands come later: each is emitted on its own
        return False
    params, reads = lw.matmul_params(m)  # safe now: any copy it makes reads computed values
    rp, r_reads = lw.reduction_params(r)
    if not _matches(dict(rp), dict(params), r_reads[0], reads):
        lw.colsums.pop(m, None)  # not this pair: each is emitted on its own
        return False
    _emit(lw, m, params, reads, r)
    return True
