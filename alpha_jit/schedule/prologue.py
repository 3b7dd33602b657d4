"""GEMM operand prologues: casts that no kernel computes, because their readers convert on load.

Why: under bf16 autocast every GEMM operand is a cast of an f32 value. A cast that only GEMMs of
the same phase read (directly or through views) gets no kernel and no buffer: the GEMM reads the
f32 source and rounds each element on load (the matmul spec's `a_round`/`b_round`), unless the
f32 source is an elementwise value read by nothing but the cast: then the cast is an ordinary
elementwise node that fuses with its source, whose group stores the bf16 copy alone (half the
bytes; 16-bit GEMM operands). A cast of
a 16-bit value to f32 (exact) that only reductions read disappears the same way: the reduction
reads the 16-bit source. Lowering (`_Lowerer._operand`) reads absorbed casts through their
sources. `ALPHA_JIT_DISABLE_PASSES=gemm_prologue` keeps both kinds as kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alpha_jit.codegen_spirv.lower import _Lowerer


def absorbed_casts(lw: _Lowerer, order: list[int]) -> set[int]:
    """The casts lowering gives no kernel and no buffer: f32 -> bf16 read only by GEMMs of
    the same phase, and exact 16-bit -> f32 read only by reductions (see the module)."""
    g = lw.g
    roots = set(g.roots())
    from alpha_jit.ir.passes.manager import disabled_passes

    if "gemm_prologue" in disabled_passes():
        return set()

    def only_gemms(u: int, phase: str) -> bool:
        if u in roots or not g.users(u):
            return False
        # a GEMM of another phase (an activation cast for forward, read again by the
        # weight-gradient GEMM) would keep the f32 source alive instead of a bf16 copy
        return all((g.op(v) == "matmul" and g.prov(v).phase == phase)
                   or (lw._cls(v) == "view" and only_gemms(v, phase))
                   for v in g.users(u))

    def only_reductions(u: int) -> bool:
        if u in roots or not g.users(u):
            return False
        return all(lw._cls(v) == "reduction"
                   or (lw._cls(v) == "view" and only_reductions(v)) for v in g.users(u))

    def widening(n: int) -> bool:  # exact: the reduction reads the 16-bit source
        return g.dtype(n).name == "f32" and g.dtype(g.args(n)[0]).name in ("bf16", "f16")

    def cast_only(n: int) -> bool:
        """The cast's f32 source is read by nothing else and fuses with it: its group then
        stores the bf16 copy alone (half the bytes), and the GEMMs read 16-bit operands."""
        x = g.args(n)[0]
        return lw._cls(x) == "elementwise" and x not in roots and g.users(x) == [n]

    return {n for n in order if g.op(n) == "cast" and (
        (g.dtype(n).name == "bf16" and g.dtype(g.args(n)[0]).name == "f32"
         and only_gemms(n, g.prov(n).phase) and not cast_only(n))
        or (widening(n) and only_reductions(n)))}
