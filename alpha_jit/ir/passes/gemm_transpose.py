"""GEMM transpose folding: `(a @ b).T` is computed as `b.T @ a.T`, in the layout it is read in.

Why: a Linear's weight is [out, in] and its forward reads it as `x @ W.T`, so autodiff's weight
gradient is `transpose(x^T @ dY)`: the GEMM writes [in, out] and everything after it (the
gradient-norm sums, the optimizer update, the tied embedding's gradient add) reads it through
the transpose, one element per [in, out] row apart: uncoalesced. On the H200 the AdamW update
of `gpt2`'s 124M parameters and the tied `wte` gradient add ran at 0.7-1.5 TB/s of ~4. Written
as `dY^T @ x`, the GEMM stores [out, in] directly (its operands are views: no copies) and the
readers stream. The bias gradient (the sum of dY's rows) then pairs with the GEMM's left
operand: the matmul family's row sums of a (schedule/colsum.py).

Rewrite: transpose(matmul(a, b)) swapping the last two axes, where the transpose is the
matmul's only user and the operands have the same rank (no broadcast batch), becomes
matmul(T(b), T(a)) with T the same swap (a T of a T is dropped). The values are identical
(the same products and sums per element); the reference interpreter runs the rewritten graph.
`ALPHA_JIT_DISABLE_PASSES=gemm_transpose` switches it off.
"""

from __future__ import annotations

from alpha_jit.ir.graph import Graph, Provenance
from alpha_jit.ir.passes.manager import register_pass


def _swaps_last_two(g: Graph, t: int) -> bool:
    """Whether transpose t exchanges the last two axes and keeps the others in place."""
    perm = tuple(g.attrs(t)["perm"])
    r = len(perm)
    return r >= 2 and perm == (*range(r - 2), r - 1, r - 2)


def _swapped(g: Graph, x: int, prov: Provenance, at: int) -> int:
    """x with its last two axes exchanged: the node under x if x is such a transpose."""
    if g.op(x) == "transpose" and _swaps_last_two(g, x):
        return g.args(x)[0]
    shape = g.shape(x)
    r = len(shape)
    perm = (*range(r - 2), r - 1, r - 2)
    return g.add("transpose", [x], {"perm": perm}, (*shape[:-2], shape[-1], shape[-2]),
                 g.dtype(x), prov, in_place_of=at)


def _fold(g: Graph, t: int, roots: set[int]) -> bool:
    """Rewrite transpose t of a matmul in place if it qualifies (see the module); t may
    leave the step (the new GEMM's result takes its place), the matmul may not."""
    m = g.args(t)[0]
    if g.op(m) != "matmul" or not _swaps_last_two(g, t) or m in roots or g.users(m) != [t]:
        return False
    a, b = g.args(m)
    if len(g.shape(a)) != len(g.shape(b)):
        return False  # a broadcast batch would need the other operand's batch axes first
    prov = g.prov(m).with_(created_by="gemm_transpose")
    # ordered where the matmul was (autodiff's transpose of a weight gradient comes at the
    # end): a weight gradient runs as soon as dY is ready
    new = g.add("matmul", [_swapped(g, b, prov, m), _swapped(g, a, prov, m)],
                dict(g.attrs(m)), g.shape(t), g.dtype(t), prov, in_place_of=m)
    g.replace_uses(t, new)
    g.remove(t)
    g.remove(m)
    return True


@register_pass("gemm_transpose", "compute transpose(a @ b) as b.T @ a.T in the layout read")
def gemm_transpose(graph: Graph) -> tuple[Graph, str]:
    todo = [t for t in graph.nodes_with_op("transpose")
            if graph.op(graph.args(t)[0]) == "matmul"]
    g = graph.copy() if todo else graph  # copied only when something may change
    roots = set(g.roots())
    folded = sum(_fold(g, t, roots) for t in todo)
    return g, f"{folded} transposed GEMM results computed in the layout they are read in"
