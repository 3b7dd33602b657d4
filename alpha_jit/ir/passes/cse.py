"""Common-subexpression elimination: one node per (op, attrs, args) value.

Autodiff and the optimizer re-derive the same constants and views many times (`1.0`, `w.T`,
`x > 0`); merging them keeps kernels and the memory plan small. Leaves are never merged:
two inputs or two state reads are distinct values even when they look alike.
"""

from __future__ import annotations

from alpha_jit.ir.graph import Graph, freeze_attrs
from alpha_jit.ir.passes.manager import register_pass

_NEVER = ("input", "state", "hparam")


@register_pass("cse", "merge nodes computing the same op on the same arguments")
def cse(graph: Graph) -> tuple[Graph, str]:
    g = graph.copy()
    seen: dict[tuple, int] = {}
    merged = 0
    for n in g.topo():
        if n not in g.g or g.op(n) in _NEVER:
            continue
        key = (g.op(n), freeze_attrs(g.attrs(n)), tuple(g.args(n)), g.shape(n), g.dtype(n).name)
        if key in seen:
            g.replace_uses(n, seen[key])
            g.remove(n)
            merged += 1
        else:
            seen[key] = n
    return g, f"merged {merged} duplicate nodes"
